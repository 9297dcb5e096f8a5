"""Callbacks: auditing a run's data order (which pair ids each optimizer step consumed, on which rank), a progress
bar without noise, and no empty run directories from runs that failed before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE


class ConsumedIds(L.Callback):
    """Appends ``{"step", "epoch", "phase", "rank", "ids"}`` per training batch to ``<path>.rank<R>.jsonl``.

    With it, a resumed run can be checked against an uninterrupted one: the ids after the resume must be exactly
    the remainder of the uninterrupted run's list.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "phase": batch.get("phase"),
                  "rank": trainer.global_rank, "ids": batch["ids"]}
        out = Path(f"{self.path}.rank{trainer.global_rank}.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")


class _WithoutVersion:
    """Progress bar mixin: no ``v_num`` (the logger's version, already in the run directory's name)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class RichBar(_WithoutVersion, RichProgressBar):
    pass


class TQDMBar(_WithoutVersion, TQDMProgressBar):
    pass


def progress_bar() -> ProgressBar:
    """Lightning's default progress bar (rich when installed), without ``v_num``."""
    return RichBar() if _RICH_AVAILABLE else TQDMBar()


class DiscardUnstartedRun(L.Callback):
    """Removes the run directory this run created when it fails before its first optimizer step (bad data, a
    missing model, a mistyped checkpoint): an empty ``runs/NAME/version_N`` says nothing and hides the real runs.

    The logger creates the directory when setup begins, before data and model are loaded; a directory that existed
    before (a resumed or fixed-version run) is never touched.
    """

    def __init__(self, run_dir: str | None):
        self.run_dir = Path(run_dir) if run_dir else None
        self.created = self.run_dir is not None and not self.run_dir.exists()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.created and trainer.is_global_zero and trainer.global_step == 0 and self.run_dir.is_dir():
            shutil.rmtree(self.run_dir, ignore_errors=True)
