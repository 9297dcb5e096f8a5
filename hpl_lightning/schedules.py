"""Learning-rate schedules: linear warmup, then cosine or linear decay to 0, or constant.

The same multipliers as Hugging Face's ``get_scheduler`` (``tests/test_schedules.py`` checks step by step), written
against ``torch.optim.lr_scheduler.LambdaLR`` because ``transformers.optimization`` imports peft and, through it,
bitsandbytes on every run, which only QLoRA needs.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch

Schedule = Literal["cosine", "linear", "constant_with_warmup"]


def lr_multiplier(step: int, schedule: Schedule, warmup: int, total: int) -> float:
    """The factor on the base learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {schedule!r}; expected cosine, linear or constant_with_warmup")


def warmup_then(optimizer: torch.optim.Optimizer, schedule: Schedule, warmup: int,
                total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_multiplier, schedule=schedule, warmup=warmup,
                                                                total=total))
