"""``train.py``: LightningCLI with HPL's defaults (checkpointing for preemption, TensorBoard, the curriculum loader).

Bad data raises :class:`~hpl_lightning.errors.DataError` in ``datamodule.setup``, before any model is loaded or any
step runs; the CLI prints it as one line naming file, line and field, and exits with status 2. So are a mistyped
option (with the closest valid names), a missing config, checkpoint or model path.

Checkpoints: ``last.ckpt`` (at the end of a fit its final step, see
:class:`~hpl_lightning.checkpointing.FinalCheckpoint`) plus the ``checkpoint.save_top_k`` most recent periodic
``stepNNNNNN.ckpt`` (at 7B a full checkpoint is ~15 GB) and, with validation data, the best one by
``best_checkpoint.monitor`` (``val/loss``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from hpl_lightning.callbacks import DiscardUnstartedRun, progress_bar
from hpl_lightning.checkpointing import FinalCheckpoint, resume_checkpoint, use_atomic_checkpoint_io
from hpl_lightning.console import ShortErrors, one_line_errors
from hpl_lightning.data import HPLDataModule
from hpl_lightning.errors import UsageError
from hpl_lightning.module import HPLModule


# --ckpt_path values Lightning resolves itself (not file names)
_CKPT_ALIASES = {"last", "best", "hpc", "registry"}


class HPLArgumentParser(ShortErrors, LightningArgumentParser):
    """LightningCLI's parser, printing a parse error first with a hint instead of the full usage."""


class HPLCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, parser_class=HPLArgumentParser, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(FinalCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "best_checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.link_arguments("model.policy", "data.tokenizer")
        parser.link_arguments("model.packing", "data.packing")  # packing is done by the collate, used by the model
        parser.set_defaults(
            {
                # last.ckpt on every save, at the end of the fit, and on SIGTERM/exceptions: a preempted run resumes
                # where it stopped, a finished one holds its final weights.
                "checkpoint.save_last": True,
                "checkpoint.save_on_exception": True,
                "checkpoint.every_n_train_steps": 100,
                # Bounded: the most recent periodic checkpoints ("step", highest first), not every one of them.
                "checkpoint.save_top_k": 2,
                "checkpoint.monitor": "step",
                "checkpoint.mode": "max",
                "checkpoint.filename": "step{step:06d}",
                "checkpoint.auto_insert_metric_name": False,
                # The best validation loss so far (validation runs at the end of each curriculum phase); no
                # validation data, no best checkpoint.
                "best_checkpoint.monitor": "val/loss",
                "best_checkpoint.mode": "min",
                "best_checkpoint.save_top_k": 1,
                "best_checkpoint.filename": "best-step{step:06d}",
                "best_checkpoint.auto_insert_metric_name": False,
                "best_checkpoint.save_on_train_epoch_end": False,  # after validation, where val/loss exists
                "lr_monitor.logging_interval": "step",
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "hpl", "default_hp_metric": False},
                },
                # The data module shards batches itself and serves one curriculum phase per epoch (it also sets
                # the reload itself, for a Trainer built in Python); the default schedule (data.schedule.unit
                # epochs, length 1: the paper's one epoch on each of the release's cumulative phases) has one
                # epoch per phase.
                "trainer.max_epochs": 3,
                "trainer.use_distributed_sampler": False,
                "trainer.reload_dataloaders_every_n_epochs": 1,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in _CKPT_ALIASES and not Path(ckpt_path).exists():
            raise UsageError(f"--ckpt_path {ckpt_path}: no such file (or 'last' to resume the latest run)")
        if config.get("data") is not None and not config["data"].get("val_path"):
            config["best_checkpoint"]["monitor"] = None  # nothing to rank by: keep none
            config["best_checkpoint"]["save_top_k"] = 0

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's default checkpoint writer swapped for the atomic one (also when ``--trainer.plugins`` names
        other plugins, e.g. SLURMEnvironment); a checkpoint IO chosen by the user is kept. The progress bar shows
        no ``v_num``; a run that fails before its first step leaves no run directory."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, progress_bar()])
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer.strategy)
        trainer.callbacks.append(DiscardUnstartedRun(getattr(trainer.logger, "log_dir", None)))
        return trainer

    def before_fit(self) -> None:
        """A damaged ``--ckpt_path`` is named; ``last`` falls back to the newest intact checkpoint."""
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resume_checkpoint(config.get("ckpt_path"), self.trainer)


def main(args: list[str] | None = None) -> None:
    """``hpl-train`` / ``python train.py``."""
    with one_line_errors(FileNotFoundError):
        HPLCLI(HPLModule, HPLDataModule, seed_everything_default=0, save_config_kwargs={"overwrite": True}, args=args)


if __name__ == "__main__":  # python -m hpl_lightning.cli fit ... (what the experiment runner starts per run)
    main()
