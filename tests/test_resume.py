"""Preemption: a fit killed mid-epoch (mid curriculum phase 2 of the one-pass schedule) and resumed with
--ckpt_path last ends with the same weights as an uninterrupted run, and consumes exactly the remainder of its pair
ids; so does a resume from a checkpoint at an epoch's last batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.synthetic import make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _fit(run: Path, train: Path, *extra: str, ckpt_every: int = 3) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "train.py", "fit",
        f"--data.train_path={train}", "--data.batch_size=4", "--data.max_length=512", "--data.seed=7",
        "--trainer.max_epochs=3",  # the configuration in which Lightning 2.6 itself loses the loader position
        "--data.schedule.unit=one_pass",  # the step numbers below are this plan's
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
        "--trainer.logger.init_args.version=0", f"--checkpoint.dirpath={run / 'ckpt'}",
        f"--checkpoint.every_n_train_steps={ckpt_every}", "--model.optim.lr=1e-3",
        "--trainer.callbacks+=hpl_lightning.callbacks.ConsumedIds",
        *extra,
    ]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _ids(run: Path, name: str) -> list[list[str]]:
    lines = (run / f"{name}.rank0.jsonl").read_text().splitlines()
    return [json.loads(line)["ids"] for line in lines]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    train = write_jsonl(tmp / "train.jsonl", make_records(n_tasks=8))
    run = tmp / "full"
    # a checkpoint at every step, all kept: step000008.ckpt is at the last batch of epoch 1 (phase 2), last.ckpt at
    # step 15
    proc = _fit(run, train, f"--trainer.callbacks.path={run / 'ids'}", "--checkpoint.save_top_k=-1", ckpt_every=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return train, run


@pytest.mark.parametrize("signal_name,kill_step", [("SIGTERM", 6), ("SIGKILL", 7)])
def test_killed_and_resumed_run_equals_uninterrupted(reference_run, tmp_path, signal_name, kill_step):
    train, full = reference_run
    full_batches = _ids(full, "ids")
    # one pass over 56 items, batch 4: phase 1 = 14 items (4 batches), phase 2 = 15 (4), phase 3 = 27 (7); steps 6
    # and 7 are in the middle of phase 2 (epoch 1). Every item is used exactly once.
    assert len(full_batches) == 15
    assert sorted(i for batch in full_batches for i in batch) == sorted(r["id"] for r in make_records(n_tasks=8))
    run = tmp_path / "killed"
    killed = _fit(run, train, f"--trainer.callbacks.path={run / 'before'}",
                  "--trainer.callbacks+=tests.killers.KillAt", f"--trainer.callbacks.step={kill_step}",
                  f"--trainer.callbacks.signal_name={signal_name}")
    # the run stopped where it was killed (Lightning exits with status 0 after a SIGTERM)
    assert len(_ids(run, "before")) == kill_step, killed.stderr[-3000:]
    saved_step = torch.load(run / "ckpt" / "last.ckpt", weights_only=False)["global_step"]
    # SIGTERM saves at the batch it arrived in; SIGKILL loses everything after the last periodic checkpoint (6)
    assert saved_step == (kill_step if signal_name == "SIGTERM" else 6)

    resumed = _fit(run, train, f"--trainer.callbacks.path={run / 'after'}", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _ids(run, "after") == full_batches[saved_step:]
    assert _ids(run, "before")[:saved_step] == full_batches[:saved_step]

    expected, got = _weights(full), _weights(run)
    assert expected.keys() == got.keys()
    diff = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert diff < 1e-6


def test_resume_from_a_checkpoint_at_an_epochs_last_batch_equals_uninterrupted(reference_run, tmp_path):
    """Step 8 closes phase 2's 4 batches; phase 3 has 7. Lightning 2.6 used to start the resumed epoch at batch 4 of
    the rebuilt, longer loader and end it 4 batches early (final step 11, not 15)."""
    train, full = reference_run
    full_batches = _ids(full, "ids")
    run = tmp_path / "resumed"
    (run / "ckpt").mkdir(parents=True)
    ckpt = shutil.copy(full / "ckpt" / "step000008.ckpt", run / "ckpt" / "step000008.ckpt")
    resumed = _fit(run, train, f"--trainer.callbacks.path={run / 'after'}", f"--ckpt_path={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _ids(run, "after") == full_batches[8:]
    expected = torch.load(full / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert got["global_step"] == expected["global_step"] == 15
    assert got["epoch"] == expected["epoch"]
    diff = max((expected["state_dict"][k] - got["state_dict"][k]).abs().max().item() for k in expected["state_dict"])
    assert diff < 1e-6
