"""Checkpoints survive a kill in the middle of their write with $TMPDIR on another filesystem, and a resume from a
truncated or corrupt last.ckpt names it and falls back to the newest intact checkpoint (or stops with exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hpl_lightning.checkpointing import atomic_torch_save, checkpoint_problem, resume_checkpoint
from tests.synthetic import make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


def _fit(run: Path, train: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "train.py", "fit", f"--data.train_path={train}", "--data.batch_size=4",
        "--data.max_length=256", "--trainer.max_steps=6", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}", "--trainer.logger.init_args.version=0",
        f"--checkpoint.dirpath={run / 'ckpt'}", "--checkpoint.every_n_train_steps=2",
        "--checkpoint.save_top_k=-1",  # keep every periodic checkpoint: the tests damage some of them
        "--data.schedule.unit=one_pass", *extra,  # the step counts below are those of one pass (7 steps)
    ]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _step(path: Path) -> int:
    return _load(path)["global_step"]


@pytest.fixture
def shm_tmpdir():
    """A private $TMPDIR on /dev/shm (tmpfs: another filesystem than the checkpoints')."""
    if not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(ROOT).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    path = Path(tempfile.mkdtemp(dir=SHM, prefix="hpl-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ unit
def test_atomic_save_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "ckpt" / "last.ckpt"
    atomic_torch_save({"global_step": 1}, target)
    (target.parent / ".last.ckpt.12345.partial").write_bytes(b"left by a kill")
    atomic_torch_save({"global_step": 2}, target)
    assert _step(target) == 2 and [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_checkpoint_problem_names_truncation_and_corruption(tmp_path):
    good = tmp_path / "good.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.randn(4096)}}, good)
    data = good.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.ckpt").write_bytes(bytes(flipped))
    assert checkpoint_problem(good) is None
    assert "truncated" in checkpoint_problem(tmp_path / "cut.ckpt")
    assert "CRC" in checkpoint_problem(tmp_path / "flipped.ckpt")


def test_an_explicitly_named_damaged_checkpoint_is_an_error(tmp_path):
    from hpl_lightning.checkpointing import CheckpointError

    bad = tmp_path / "step000004.ckpt"
    bad.write_bytes(b"PK\x03\x04 not much")
    with pytest.raises(CheckpointError, match="step000004.ckpt: truncated"):
        resume_checkpoint(str(bad), trainer=None)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def train(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("ckpt") / "train.jsonl", make_records(n_tasks=3))


def _consumed(run: Path) -> list[list[str]]:
    return [json.loads(line)["ids"] for line in (run / "ids.rank0.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step_for_every_consumer(train, tmp_path):
    """The one pass is 7 steps, a checkpoint every 2: Lightning alone left last.ckpt at step 6. Ended by the epochs,
    by max_steps (5) or by should_stop (3, as EarlyStopping ends a fit), or saving by epochs, last.ckpt holds the
    final step; resuming a finished run trains nothing, and resuming with a larger max_steps goes on as one
    uninterrupted run."""
    audit = ["--trainer.callbacks+=hpl_lightning.callbacks.ConsumedIds"]
    full, part, stopped, epochs = (tmp_path / name for name in ("full", "part", "stopped", "epochs"))
    for run, limit in ((full, "-1"), (part, "5")):
        done = _fit(run, train, f"--trainer.max_steps={limit}", *audit, f"--trainer.callbacks.path={run / 'ids'}")
        assert done.returncode == 0, done.stderr[-3000:]
    assert _step(full / "ckpt" / "last.ckpt") == 7 and len(_consumed(full)) == 7
    assert _step(part / "ckpt" / "last.ckpt") == 5

    again = _fit(full, train, "--trainer.max_steps=-1", "--ckpt_path=last", *audit,
                 f"--trainer.callbacks.path={full / 'ids'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _step(full / "ckpt" / "last.ckpt") == 7 and len(_consumed(full)) == 7  # nothing trained twice

    more = _fit(part, train, "--trainer.max_steps=-1", "--ckpt_path=last", *audit,
                f"--trainer.callbacks.path={part / 'ids'}")
    assert more.returncode == 0, more.stderr[-3000:]
    assert _consumed(part) == _consumed(full)
    expected, got = _load(full / "ckpt" / "last.ckpt"), _load(part / "ckpt" / "last.ckpt")
    assert got["global_step"] == 7
    weights = expected["state_dict"]
    assert max((weights[k] - got["state_dict"][k]).abs().max().item() for k in weights) < 1e-6

    done = _fit(stopped, train, "--trainer.max_steps=-1", "--trainer.callbacks+=tests.killers.StopAt",
                "--trainer.callbacks.step=3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _step(stopped / "ckpt" / "last.ckpt") == 3

    # saving by epochs (phases of 2, 2 and 3 steps): the final epoch's own checkpoint is kept too
    done = _fit(epochs, train, "--trainer.max_steps=-1", "--checkpoint.every_n_train_steps=null",
                "--checkpoint.every_n_epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (epochs / "ckpt").iterdir()) == [
        "last.ckpt", "step000002.ckpt", "step000004.ckpt", "step000007.ckpt"]
    assert _step(epochs / "ckpt" / "last.ckpt") == 7


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_with_tmpdir_elsewhere_then_resume(train, tmp_path, shm_tmpdir):
    run = tmp_path / "run"
    # the process dies inside the write of step 4's checkpoint (past its first 64 KiB)
    killed = _fit(run, train, "--trainer.callbacks+=tests.killers.DieInNextFileWrite", "--trainer.callbacks.step=4",
                  env={"TMPDIR": str(shm_tmpdir)})
    assert killed.returncode == -25, killed.stderr[-3000:]  # SIGXFSZ
    assert _step(run / "ckpt" / "last.ckpt") == 2  # the previous checkpoint, whole
    resumed = _fit(run, train, "--ckpt_path=last", env={"TMPDIR": str(shm_tmpdir)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint at" in resumed.stderr + resumed.stdout
    assert _step(run / "ckpt" / "last.ckpt") == 6
    leftovers = [p.name for p in (run / "ckpt").iterdir() if not p.name.startswith("step")]
    assert leftovers == ["last.ckpt"], leftovers  # no partial file beside the checkpoints
    assert [p for p in shm_tmpdir.iterdir() if p.is_file()] == []  # nor in $TMPDIR (torch may add cache folders)


@pytest.mark.slow
def test_resume_from_a_truncated_last_falls_back_to_the_newest_intact(train, tmp_path):
    run = tmp_path / "run"
    done = _fit(run, train)  # 6 steps, a checkpoint every 2: step000002/4/6.ckpt and last.ckpt (step 6)
    assert done.returncode == 0, done.stderr[-3000:]
    last = run / "ckpt" / "last.ckpt"
    # what a kill during the old cross-filesystem copy left: the first part of last.ckpt, step 6 lost with it;
    # step000006.ckpt damaged too, so the fallback has to skip it
    last.write_bytes(last.read_bytes()[:320_000])
    six = run / "ckpt" / "step000006.ckpt"
    six.write_bytes(six.read_bytes()[:1000])
    os.utime(run / "ckpt" / "step000004.ckpt", (1e9, 2e9))
    os.utime(run / "ckpt" / "step000002.ckpt", (1e9, 1e9))
    resumed = _fit(run, train, "--ckpt_path=last", "--trainer.max_steps=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warning = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert warning == [f"warning: {last}: truncated or not a checkpoint: no zip directory at the end of its 320,000 "
                       f"bytes; resuming from {run / 'ckpt' / 'step000004.ckpt'} instead, the newest intact "
                       f"checkpoint in {run / 'ckpt'}"]
    assert f"Restored all states from the checkpoint at {run / 'ckpt' / 'step000004.ckpt'}" in resumed.stderr
    # last.ckpt whole again, and the run trained through the whole of phase 3 as an uninterrupted run would: the one
    # pass is 7 steps (phases of 2, 2 and 3 batches; step 4 closes phase 2), last.ckpt at its final step
    assert checkpoint_problem(last) is None and _step(last) == 7
    assert "Traceback" not in resumed.stderr


@pytest.mark.slow
def test_resume_with_nothing_intact_is_one_line_and_exit_2(train, tmp_path):
    ckpt = tmp_path / "run" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "last.ckpt").write_bytes(b"")
    done = _fit(tmp_path / "run", train, "--ckpt_path=last")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: unusable checkpoint: {ckpt / 'last.ckpt'}: empty file (0 bytes); no intact checkpoint beside it in "
        f"{ckpt} to resume from (move it away to start afresh)")


@pytest.mark.parametrize("extra", [[], ["--trainer.plugins=lightning.pytorch.plugins.environments.SLURMEnvironment"]])
def test_the_trainer_writes_checkpoints_atomically_whatever_the_plugins(tmp_path, extra):
    from hpl_lightning.checkpointing import AtomicCheckpointIO
    from hpl_lightning.cli import HPLCLI
    from hpl_lightning.data import HPLDataModule
    from hpl_lightning.module import HPLModule

    cli = HPLCLI(HPLModule, HPLDataModule, run=False,
                 args=["--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}", *extra])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
