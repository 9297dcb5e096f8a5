"""A callback that saves the first optimizer step's gradients (after DDP's all-reduce) and the per-level pair counts
logged for that step, so runs with different batch sizes, accumulation and device counts can be compared."""

from __future__ import annotations

import lightning as L
import torch


class SaveFirstGradients(L.Callback):
    def __init__(self, path: str):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step != 0 or trainer.global_rank != 0:
            return
        grads = {n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters() if p.grad is not None}
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        torch.save({"grads": grads, "logged": logged}, self.path)
