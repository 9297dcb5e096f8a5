"""Builds ``data/quickstart-sciworld/`` from real ScienceWorld data with the data pipeline, end to end.

Nothing is synthetic: the experts are the simulator's gold paths played through the environment (score 100), the
rollouts are episodes of the tiny policy ``hpl-tiny`` (random init, so its actions are mostly invalid) against the
real simulator from the experts' prefixes, and every reward is the environment's (best score / 100). Steps, all of
them the documented pipeline commands (``python -m hpl_lightning.pipeline ...``):

1. ``import --source sciworld_gold`` on a hand-picked subset of ``splits.json``: TRAIN_VARIATIONS (train split, for
   ``train.jsonl``) and VAL_VARIATIONS (dev split = ETO's "seen" test, for ``val.jsonl``);
2. ``segment --segmenter semantic_embedding`` (the paper's default segmenter);
3. ``explore`` with ``hpl-tiny`` at all three levels, M = 2 MC samples, the costs bounded (EXPLORE below);
4. ``pairs --with_experts true`` with the paper's filters: trajectory, step and group pairs plus the expert
   trajectories (behaviour cloning) in one file.

Run (2 CPU cores: a few minutes; needs Java 17)::

    python scripts/build_sciworld_quickstart.py

The intermediate files (gold experts, segmented experts, rollouts) go to ``--workdir`` (default
``runs/quickstart-sciworld-build``, git-ignored) and are started afresh each run unless ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT.parent / "shared" / "data" / "sciworld" / "splits.json"
OUT = ROOT / "data" / "quickstart-sciworld"

# Train variations (all in splits.train) of 10 task types, gold paths of 5-23 actions.
TRAIN_VARIATIONS = [
    ["lifespan-longest-lived-then-shortest-lived", 47],  # 5 gold actions
    ["find-non-living-thing", 58],  # 5
    ["lifespan-shortest-lived", 12],  # 8
    ["find-animal", 0],  # 10
    ["find-plant", 30],  # 12
    ["identify-life-stages-2", 2],  # 12
    ["power-component", 1],  # 13
    ["chemistry-mix-paint-secondary-color", 12],  # 15
    ["use-thermometer", 172],  # 18
    ["test-conductivity-of-unknown-substances", 195],  # 23
]
# Dev variations (splits.dev, ETO's "seen" test) of 3 task types, for validation.
VAL_VARIATIONS = [
    ["lifespan-longest-lived-then-shortest-lived", 87],  # 5
    ["find-living-thing", 161],  # 10
    ["power-component", 11],  # 13
]
SEGMENTER = "semantic_embedding"
MAX_NEGATIVES = "2"  # negative groups per expert group (explore and pairs)
EXPLORE = [
    "--policy", "hpl-tiny",
    "--exploration.mc_samples", "2",  # M
    "--exploration.max_negatives", MAX_NEGATIVES,
    "--exploration.max_tries", "4",
    "--exploration.step_stride", "1",
    "--exploration.max_actions", "2",  # agent actions per rollout after the expert prefix
    "--max_new_tokens", "12",
    "--envs", "2",
    "--threads", "1",
    "--seed", "0",
]


def pipeline(*args: str) -> None:
    print("$ python -m hpl_lightning.pipeline " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "hpl_lightning.pipeline", *args], cwd=ROOT, check=True)


def build(name: str, split: str, variations: list[list], work: Path) -> Counter:
    splits = json.loads(SPLITS.read_text())
    for s in splits["splits"]:
        splits["splits"][s] = variations if s == split else []
    for v in variations:
        assert v in json.loads(SPLITS.read_text())["splits"][split], f"{v} is not in splits.{split}"
    (work / f"{name}_splits.json").write_text(json.dumps(splits))
    gold, segmented = work / f"{name}_gold.jsonl", work / f"{name}_segmented.jsonl"
    rollouts, out = work / f"{name}_rollouts.jsonl", OUT / f"{name}.jsonl"
    pipeline("import", "--source", "sciworld_gold", "--split", split, "--splits", str(work / f"{name}_splits.json"),
             "--output", str(gold))
    n_gold = sum(1 for line in gold.read_text().splitlines() if line.strip())
    if n_gold != len(variations):
        raise SystemExit(f"{name}: only {n_gold} of {len(variations)} gold paths reached score 100")
    pipeline("segment", "--input", str(gold), "--output", str(segmented), "--segmenter", SEGMENTER)
    pipeline("explore", "--experts", str(segmented), "--output", str(rollouts), "--benchmark", "sciworld",
             "--progress", "false", *EXPLORE)
    pipeline("pairs", "--experts", str(segmented), "--rollouts", str(rollouts), "--output", str(out),
             "--max_negatives", MAX_NEGATIVES, "--with_experts", "true")
    counts: Counter = Counter()
    for line in out.read_text().splitlines():
        record = json.loads(line)
        counts[record.get("level", "expert")] += 1
    missing = [level for level in ("expert", "trajectory", "step", "group") if not counts[level]]
    if missing:
        raise SystemExit(f"{out}: no {missing} records ({dict(counts)})")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "quickstart-sciworld-build"))
    parser.add_argument("--resume", action="store_true", help="keep the workdir's files (explore resumes)")
    args = parser.parse_args()
    work = Path(args.workdir)
    if work.exists() and not args.resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, split, variations in (("train", "train", TRAIN_VARIATIONS), ("val", "dev", VAL_VARIATIONS)):
        counts = build(name, split, variations, work)
        size = (OUT / f"{name}.jsonl").stat().st_size
        print(f"{name}.jsonl: {dict(sorted(counts.items()))}, {size / 1024:.0f} KiB", flush=True)


if __name__ == "__main__":
    main()
