"""Callbacks for auditing a run's data order (which pair ids each optimizer step consumed, on which rank)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


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
