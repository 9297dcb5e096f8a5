"""DDP with 2 CPU processes (gloo), and sharded FSDP2 (ModelParallelStrategy) with an exact sharded resume."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from hpl_lightning.curriculum import Curriculum, phase_members
from hpl_lightning.schema import load_records
from tests.synthetic import make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _fit(run: Path, train: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [
        sys.executable, "train.py", "fit", f"--data.train_path={train}", "--data.batch_size=2",
        "--data.max_length=512", "--trainer.max_epochs=3", "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={run}",
        f"--trainer.logger.init_args.save_dir={run}", "--trainer.logger.init_args.version=0",
        f"--checkpoint.dirpath={run / 'ckpt'}", "--trainer.callbacks+=hpl_lightning.callbacks.ConsumedIds",
        f"--trainer.callbacks.path={run / 'ids'}", *extra,
    ]
    # a session of its own: a test may kill the whole process group (all ranks) like a lost node
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900, start_new_session=True)


def _consumed(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"ids.rank{rank}.jsonl").read_text().splitlines()]


def test_ddp_ranks_get_disjoint_shares_that_cover_each_phase(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=3))
    proc = _fit(tmp_path / "run", train, "--trainer.strategy=ddp")
    assert proc.returncode == 0, proc.stderr[-4000:]

    records = [r for r, _ in load_records(train)]
    curriculum = Curriculum(length_thresholds=(2, 4))  # the paper's for InterCode-SQL, the synthetic data's benchmark
    levels = [getattr(r, "level", "bc") for r in records]
    first = [curriculum.first_phase(level, getattr(r, "group_length", None), getattr(r, "difficulty", None))
             for level, r in zip(levels, records)]
    per_rank_epoch: dict[int, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    steps = {}
    for rank in (0, 1):
        batches = _consumed(tmp_path / "run", rank)
        steps[rank] = len(batches)
        for b in batches:
            per_rank_epoch[b["epoch"]][rank].extend(b["ids"])
    assert steps[0] == steps[1]
    for epoch in range(3):
        ids0, ids1 = per_rank_epoch[epoch][0], per_rank_epoch[epoch][1]
        assert not set(ids0) & set(ids1), f"epoch {epoch}: ranks share pairs"
        expected = sorted(records[i].id for i in phase_members(first, epoch + 1))  # the cumulative pool
        assert sorted(ids0 + ids1) == expected, f"epoch {epoch}: the ranks do not cover phase {epoch + 1}"
    assert (tmp_path / "run" / "ckpt" / "last.ckpt").exists()


def _sharded_policy(ckpt_dir: Path, out: Path) -> dict:
    """A sharded (distributed) checkpoint consolidated into one state dict."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt_dir, out)
    state = torch.load(out, weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("policy.")}


def test_fsdp2_fits_saves_sharded_checkpoints_and_resumes_exactly(tmp_path):
    import torch

    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=3))
    strategy = [
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
        "--checkpoint.every_n_train_steps=3",
    ]
    full = _fit(tmp_path / "full", train, *strategy)
    assert full.returncode == 0, full.stderr[-4000:]
    last = tmp_path / "full" / "ckpt" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard per rank

    killed_run = tmp_path / "killed"
    # every rank SIGKILLed at step 4, mid phase 2 (one pass over 21 items, 2x2 per step: phases of 2, 2 and 3
    # steps): resume from the checkpoint of step 3
    killed = _fit(killed_run, train, *strategy, "--trainer.callbacks+=tests.killers.KillAt",
                  "--trainer.callbacks.step=4", "--trainer.callbacks.signal_name=SIGKILL",
                  "--trainer.callbacks.process_group=true")
    assert killed.returncode == -9 and len(_consumed(killed_run, 0)) == 4, killed.stderr[-4000:]
    resumed = _fit(killed_run, train, *strategy, "--ckpt_path=last",
                   f"--trainer.callbacks.path={killed_run / 'after'}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for rank in (0, 1):
        after = [b["ids"] for b in (json.loads(x) for x in (killed_run / f"after.rank{rank}.jsonl").read_text().splitlines())]
        assert after == [b["ids"] for b in _consumed(tmp_path / "full", rank)][3:]  # redo step 4, then onwards

    expected = _sharded_policy(last, tmp_path / "full.pt")
    got = _sharded_policy(killed_run / "ckpt" / "last.ckpt", tmp_path / "resumed.pt")
    assert expected and expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) < 1e-6
    assert not any(k.startswith("reference.") for k in torch.load(tmp_path / "full.pt", weights_only=False)["state_dict"])
