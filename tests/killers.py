"""Callbacks that kill their own process at a known point: preemption, deterministically.

``KillAt`` kills at a given optimizer step (or the whole process group: every rank at once, like a lost node);
``DieInNextFileWrite`` kills the process inside the next file write past a size, e.g. halfway through a checkpoint.
``StopAt`` ends a fit early the way EarlyStopping or ``max_time`` do (``trainer.should_stop``), without a kill.
"""

from __future__ import annotations

import os
import resource
import signal

import lightning as L


class KillAt(L.Callback):
    """Kills at the end of optimizer step ``step``. Callbacks listed before it (e.g. ``ConsumedIds``) have run for
    that step on every rank first: with ``process_group`` the ranks meet at a barrier, then rank 0 kills the group,
    so no rank is killed before it has recorded the step."""

    def __init__(self, step: int, signal_name: str = "SIGTERM", process_group: bool = False):
        self.step, self.signal, self.process_group = step, getattr(signal, signal_name), process_group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.process_group:
                trainer.strategy.barrier("kill_at")  # every rank has run its callbacks before this one
                if trainer.global_rank != 0:
                    return  # rank 0 kills the group
                os.killpg(os.getpgid(0), self.signal)
            os.kill(os.getpid(), self.signal)


class StopAt(L.Callback):
    """Sets ``trainer.should_stop`` at the end of optimizer step ``step``: the fit ends there, normally."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


class DieInNextFileWrite(L.Callback):
    """At the end of optimizer step ``step`` (before that step's checkpoint is saved: checkpoint callbacks run
    last), limits this process's files to ``max_bytes``: the first write past it kills the process with SIGXFSZ, in
    the middle of writing, wherever the file is (CPython ignores SIGXFSZ by default; it is restored here)."""

    def __init__(self, step: int, max_bytes: int = 65536):
        self.step, self.max_bytes = step, max_bytes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def die_after_appends(module: str, n: int) -> None:
    """Makes ``module.append_jsonl`` (a crash-safe writer's one output path) SIGKILL the process right after its
    ``n``-th record is flushed, having begun the next line as a kill in the middle of a write would leave it."""
    import importlib

    target = importlib.import_module(module)
    append, calls = target.append_jsonl, [0]

    def append_then_die(path, objs) -> None:
        append(path, objs)
        calls[0] += 1
        if calls[0] == n:
            with open(path, "a") as f:
                f.write('{"key": "cut short by the kill')
            os.kill(os.getpid(), signal.SIGKILL)

    target.append_jsonl = append_then_die


if __name__ == "__main__":
    # python -m tests.killers MODULE N SCRIPT.py|PACKAGE.MODULE ARGS...: run a command that dies after N records
    import runpy
    import sys

    module, n, command, *rest = sys.argv[1:]
    die_after_appends(module, int(n))
    sys.argv = [command, *rest]
    if command.endswith(".py"):
        runpy.run_path(command, run_name="__main__")
    else:
        runpy.run_module(command, run_name="__main__", alter_sys=True)
