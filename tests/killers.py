"""A callback that kills its own process (or its whole process group: every rank at once, like a lost node) at a
given optimizer step: preemption, deterministically."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAt(L.Callback):
    def __init__(self, step: int, signal_name: str = "SIGTERM", process_group: bool = False):
        self.step, self.signal, self.process_group = step, getattr(signal, signal_name), process_group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.process_group:
                if trainer.global_rank != 0:
                    return  # rank 0 kills the group after its own callbacks ran: what it recorded is deterministic
                os.killpg(os.getpgid(0), self.signal)
            os.kill(os.getpid(), self.signal)
