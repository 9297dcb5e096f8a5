"""``train.py``: LightningCLI with HPL's defaults (checkpointing for preemption, TensorBoard, the curriculum loader).

Bad data raises :class:`~hpl_lightning.schema.DataError` in ``datamodule.setup``, before any model is loaded or any
step runs; the CLI prints it as one line naming file, line and field, and exits with status 2.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from hpl_lightning.checkpointing import resume_checkpoint, use_atomic_checkpoint_io
from hpl_lightning.data import HPLDataModule
from hpl_lightning.module import HPLModule
from hpl_lightning.schema import DataError, UsageError


class HPLCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.link_arguments("model.policy", "data.tokenizer")
        parser.link_arguments("model.packing", "data.packing")  # packing is done by the collate, used by the model
        parser.set_defaults(
            {
                # last.ckpt on every save, plus one on SIGTERM/exceptions: a preempted run resumes where it stopped.
                "checkpoint.save_last": True,
                "checkpoint.save_on_exception": True,
                "checkpoint.every_n_train_steps": 100,
                "checkpoint.save_top_k": -1,
                "checkpoint.filename": "step{step:06d}",
                "checkpoint.auto_insert_metric_name": False,
                "lr_monitor.logging_interval": "step",
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "hpl"},
                },
                # The data module shards batches itself and serves one curriculum phase per epoch; the default
                # schedule (data.schedule.unit one_pass, the paper's one epoch) has one epoch per phase.
                "trainer.max_epochs": 3,
                "trainer.use_distributed_sampler": False,
                "trainer.reload_dataloaders_every_n_epochs": 1,
            }
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's default checkpoint writer swapped for the atomic one (also when ``--trainer.plugins`` names
        other plugins, e.g. SLURMEnvironment); a checkpoint IO chosen by the user is kept."""
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer.strategy)
        return trainer

    def before_fit(self) -> None:
        """A damaged ``--ckpt_path`` is named; ``last`` falls back to the newest intact checkpoint."""
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resume_checkpoint(config.get("ckpt_path"), self.trainer)


def main(args: list[str] | None = None) -> None:
    try:
        HPLCLI(
            HPLModule,
            HPLDataModule,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except DataError as e:
        print(f"error: invalid data: {e}", file=sys.stderr)
        sys.exit(2)
    except UsageError as e:  # a setting that cannot work (e.g. an unusable checkpoint), found before training
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # python -m hpl_lightning.cli fit ... (what the experiment runner starts per run)
    main()
