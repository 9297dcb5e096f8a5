"""The processes a stage starts and stops: a training run as a subprocess, a model server for the time a stage
needs it, and the GPU memory an in-process stage cached.

Training runs as a subprocess per run (``python -m hpl_lightning.cli fit``): Lightning's DDP launcher re-executes
its command line, a run's memory (GPU included) is returned when it ends, and a run can be killed alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from hpl_lightning.experiment.settings import Serving, unflatten


def train_process(stage_dir: Path, base_config: str | None, options: dict[str, Any], label: str) -> tuple[Path, int]:
    """``python -m hpl_lightning.cli fit`` with the merged options, resumed from its last.ckpt if any; the
    checkpoint of the final step (``ckpt/last.ckpt``, which the fit writes at its last step) and that step."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "train.yaml").write_text(json.dumps(unflatten(options), indent=1))  # JSON is YAML
    cmd = [sys.executable, "-m", "hpl_lightning.cli", "fit"]
    if base_config:
        cmd += ["-c", base_config]
    cmd += ["-c", str(stage_dir / "train.yaml"), "--ckpt_path", "last"]
    with open(stage_dir / "train.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = (stage_dir / "train.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"training {label} failed (exit {done.returncode}); log {stage_dir / 'train.log'}:\n{tail}")
    ckpt = stage_dir / "ckpt" / "last.ckpt"
    if not ckpt.exists():
        raise RuntimeError(f"training {label} ended without {ckpt}")
    from hpl_lightning.checkpointing import checkpoint_step

    return ckpt, checkpoint_step(ckpt)


@contextlib.contextmanager
def served(serving: Serving, model_dir: Path) -> Iterator[tuple[str, str | None]]:
    """(policy name, base_url) for ``model_dir``: the directory itself locally, or a served model (started by
    ``serving.command`` for the duration, its whole process group stopped after)."""
    if serving.base_url is None:
        yield str(model_dir), None
        return
    name = str(model_dir)
    if serving.command is None:
        yield name, serving.base_url
        return
    port = serving.base_url.rsplit(":", 1)[-1].split("/")[0]
    cmd = serving.command.format(model=shlex.quote(str(model_dir)), name=shlex.quote(name), port=port)
    log = open(model_dir.parent / "server.log", "a")
    proc = subprocess.Popen(cmd, shell=True, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + serving.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see {model_dir.parent / 'server.log'}")
            try:
                with urllib.request.urlopen(serving.base_url.rstrip("/") + "/models", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not answer at {serving.base_url} in "
                                       f"{serving.startup_timeout} s")
                time.sleep(2)
        yield name, serving.base_url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        log.close()


def release_device(device: str) -> None:
    """Returns the GPU memory an in-process stage cached, so the next training subprocess finds it free."""
    if device.startswith("cuda"):
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()
