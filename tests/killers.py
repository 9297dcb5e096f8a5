"""A callback that kills its own process at a given optimizer step: preemption, deterministically."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAt(L.Callback):
    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        self.step, self.signal = step, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)
