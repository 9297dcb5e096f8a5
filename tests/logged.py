"""A callback that appends what each validation logged (``val/*``, in logging order) to ``<path>.rank<R>.jsonl``, so
runs with different batch sizes and device counts, and the ranks of one run, can be compared."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class SaveValidationMetrics(L.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        record = {"step": trainer.global_step, "sanity": trainer.sanity_checking, "metrics": metrics}
        out = Path(f"{self.path}.rank{trainer.global_rank}.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
