"""DDP with 2 CPU processes (gloo), validation whatever each rank's shard holds, and sharded FSDP2
(ModelParallelStrategy) with an exact sharded resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from hpl_lightning.cli import main
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
    # a session of its own: a test may kill the whole process group (all ranks) like a lost node, and a hung run is
    # ended whole (a rank hung in a collective ignores SIGTERM) and fails the test instead of hanging it
    with subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"the run did not finish in 900 s:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


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


def _validations(path: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in Path(f"{path}.rank{rank}.jsonl").read_text().splitlines()]


def test_validation_logs_the_objective_over_the_split_whatever_the_batches_and_ranks(tmp_path):
    """9 validation items dealt to 2 ranks (batch 4): rank 0 gets the trajectory and step pairs, rank 1 the expert
    trajectories and group pairs and, last, a batch of padding only. The 2-rank fit used to hang in its sanity check
    (the ranks logged different keys, so their metric syncs did not pair up). Now both ranks log the same keys in
    the same order, and the sanity check over the whole split (initial weights) logs what one process logs with
    validation batches of 8 or of 1; val/loss is the objective: the sum of the level means (weights 1)."""
    records = {r["id"]: r for r in make_records(n_tasks=3)}
    order = ["traj-0", "bc-0", "step-0", "group-0-0", "traj-1", "bc-1", "step-1", "group-1-0", "traj-2"]
    val = write_jsonl(tmp_path / "val.jsonl", [records[i] for i in order])
    train = write_jsonl(tmp_path / "train.jsonl", list(records.values()))
    common = [f"--data.val_path={val}", "--data.max_length=512", "--trainer.accelerator=cpu",
              "--trainer.enable_progress_bar=false", "--trainer.callbacks+=tests.logged.SaveValidationMetrics"]
    single = {}
    for batch in (8, 1):
        run = tmp_path / f"b{batch}"
        main(["validate", *common, f"--data.batch_size={batch}", f"--trainer.callbacks.path={run / 'val'}",
              f"--trainer.default_root_dir={run}", "--trainer.logger=false"])
        (single[batch],) = _validations(run / "val", 0)
    run = tmp_path / "ddp"
    proc = _fit(run, train, *common[:2], "--data.batch_size=4", "--trainer.strategy=ddp", "--trainer.max_steps=1",
                "--trainer.val_check_interval=1", "--trainer.num_sanity_val_steps=-1", *common[-1:],
                f"--trainer.callbacks.path={run / 'val'}", f"--best_checkpoint.dirpath={run / 'ckpt'}")
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [_validations(run / "val", rank) for rank in (0, 1)]
    assert [[(v["sanity"], list(v["metrics"])) for v in r] for r in ranks] == [
        [(True, list(single[8]["metrics"])), (False, list(single[8]["metrics"]))]] * 2
    expected = single[8]["metrics"]
    assert {f"val/{level}/loss" for level in ("traj", "step", "group", "bc")} < expected.keys()
    assert expected["val/loss"] == pytest.approx(sum(expected[f"val/{k}/loss"] for k in ("traj", "step", "group",
                                                                                          "bc")), rel=1e-6)
    for name, got in (("batch 1", single[1]), ("2 ranks x batch 4", ranks[0][0]), ("rank 1", ranks[1][0])):
        assert got["metrics"] == pytest.approx(expected, rel=1e-5, abs=1e-6), name
    assert ranks[0][1]["metrics"] == ranks[1][1]["metrics"]  # after a step: one value on every rank
    assert (run / "ckpt" / "best-step000001.ckpt").is_file()  # chosen by val/loss


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
