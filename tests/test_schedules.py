"""The learning-rate schedules equal Hugging Face's ``get_scheduler`` step by step, and training imports no
bitsandbytes (only QLoRA needs it)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hpl_lightning.schedules import warmup_then


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant_with_warmup"])
@pytest.mark.parametrize("warmup, total", [(0, 7), (2, 19), (10, 10), (3, 1)])
def test_schedules_equal_transformers(schedule: str, warmup: int, total: int) -> None:
    from transformers import get_scheduler

    def lrs(make) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler = make(optimizer)
        out = []
        for _ in range(total + 2):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    ours = lrs(lambda o: warmup_then(o, schedule, warmup, total))
    theirs = lrs(lambda o: get_scheduler(schedule, o, num_warmup_steps=warmup, num_training_steps=total))
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_the_training_command_imports_no_bitsandbytes() -> None:
    """``import hpl_lightning.cli`` (what hpl-train loads before any option is read) stays free of bitsandbytes."""
    code = "import sys, hpl_lightning.cli, hpl_lightning.module; print('bitsandbytes' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
