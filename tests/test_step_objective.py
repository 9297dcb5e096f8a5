"""Each level is averaged over its pairs in the whole optimizer step: the first step's gradient is the same whatever
the batch size, the gradient accumulation or the number of DDP ranks (and with packing or the reference cache)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from hpl_lightning.cli import main
from tests.synthetic import make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
PREFIX_LEVEL = {"traj": "traj", "step": "step", "group": "group"}


def _args(run: Path, train: Path, batch: int, accumulate: int, *extra: str) -> list[str]:
    return [
        "fit", f"--data.train_path={train}", f"--data.batch_size={batch}", "--data.max_length=512",
        f"--trainer.accumulate_grad_batches={accumulate}", "--trainer.max_steps=1", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}",
        "--checkpoint.save_last=false", "--checkpoint.save_on_exception=false", "--model.bc_on_chosen=true",
        "--trainer.callbacks+=tests.gradients.SaveFirstGradients", f"--trainer.callbacks.path={run / 'grads.pt'}",
        "--trainer.callbacks+=hpl_lightning.callbacks.ConsumedIds", f"--trainer.callbacks.path={run / 'ids'}",
        *extra,
    ]


def _first_step(run: Path, ranks: int, accumulate: int) -> tuple[dict, Counter]:
    saved = torch.load(run / "grads.pt", weights_only=False)
    ids = []
    for rank in range(ranks):
        lines = (run / f"ids.rank{rank}.jsonl").read_text().splitlines()
        ids += [i for line in lines[:accumulate] for i in json.loads(line)["ids"]]
    levels = Counter(PREFIX_LEVEL.get(i.split("-")[0], "bc") for i in ids)
    return saved, levels


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("objective") / "train.jsonl", make_records(n_tasks=8))


def test_first_step_gradient_is_independent_of_batching(train, tmp_path):
    runs = {  # name: (batch size, accumulation, extra options); 8 items per optimizer step in each
        "b8": (8, 1, ()),
        "b2xacc4": (2, 4, ()),
        "b1xacc8": (1, 8, ()),
        "b2xacc4-packed": (2, 4, ("--model.packing=true",)),
        "b2xacc4-refcache": (2, 4, (f"--model.reference_cache={tmp_path / 'cache'}",)),
    }
    results = {}
    for name, (batch, accumulate, extra) in runs.items():
        main(_args(tmp_path / name, train, batch, accumulate, *extra))
        results[name] = _first_step(tmp_path / name, 1, accumulate)
    # 4 per step on each of 2 DDP ranks (gloo): a subprocess, since DDP re-executes the command line
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "train.py", *_args(ddp, train, 4, 1, "--trainer.devices=2", "--trainer.strategy=ddp")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results["b4x2ranks"] = _first_step(ddp, 2, 1)

    expected_grads, expected_levels = results["b8"][0]["grads"], results["b8"][1]
    assert len(set(expected_levels) - {"bc"}) >= 2, expected_levels  # the step mixes levels
    for name, (saved, levels) in results.items():
        assert levels == expected_levels, name  # the same items in the first optimizer step
        for level in ("traj", "step", "group"):  # train/{level}/pairs: the step's pairs of each level
            assert saved["logged"][f"train/{level}/pairs"] == levels[level], (name, level)
        grads = saved["grads"]
        assert grads.keys() == expected_grads.keys()
        diff = max((grads[k] - expected_grads[k]).abs().max().item() for k in grads)
        assert diff < 1e-5, f"{name}: max abs gradient difference {diff:.2e} from batch 8 x accumulate 1"
        assert saved["logged"]["train/loss"] == pytest.approx(results["b8"][0]["logged"]["train/loss"], abs=1e-5)

