"""Throughput of ScienceWorld, this checkout against an earlier commit, side by side in one run on the same
variations and machine: the gold check (``evaluate.py gold``), and episodes of fixed actions (what evaluation and
exploration pay per step; the actions: this checkout's gold paths, generated once before the rounds).

    python benchmarks/sciworld_gold.py                         # vs 0b54b5e (before the simulator was deterministic)
    python benchmarks/sciworld_gold.py --every 1 --rounds 1    # the whole split once each

The earlier commit is exported (``git archive``) into a temporary directory and run with this environment's Python.
Variations: every ``--every``-th of the split (all task types), written to a temporary ``splits.json`` both read.
Rounds alternate which code runs first (ABBA), so a load change on a shared machine hits both. Each run reports
environment steps per second and variations per minute (the gold paths differ in length between the two codes, so
both matter), and the episodes their steps per second; each round gives after/before ratios, and the verdict is
their median (spread: min and max). Prints the load (1-minute average) around every run and one JSON line. Last
line: ``ratio: <median after/before steps/s of the gold check>``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"wall time ([\d.]+) s, (\d+) environment steps")
SUCCESS = re.compile(r"^success: (\d+)/(\d+)$", re.M)


def export(commit: str, into: Path) -> Path:
    """The commit's files (not a worktree: the repository is left as it is)."""
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def subset(split: str, every: int, into: Path) -> tuple[Path, int]:
    """A copy of ``splits.json`` whose ``split`` keeps every ``every``-th variation."""
    from hpl_lightning.envs.sciworld import DEFAULT_SPLITS

    raw = json.loads(Path(DEFAULT_SPLITS).read_text())
    raw["splits"][split] = raw["splits"][split][::every]
    path = into / "splits.json"
    path.write_text(json.dumps(raw))
    return path, len(raw["splits"][split])


def gold(code: Path, split: str, splits: Path, workers: int) -> dict:
    cmd = [sys.executable, "evaluate.py", "gold", "--benchmark", "sciworld", "--split", split,
           "--workers", str(workers), "--splits", str(splits)]
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{code}: {' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    wall, steps = SUMMARY.search(done.stdout).groups()
    matched, total = SUCCESS.search(done.stdout).groups()
    wall, steps, total = float(wall), int(steps), int(total)
    return {"seconds": wall, "steps": steps, "matched": int(matched), "variations": total,
            "steps_per_second": steps / wall, "variations_per_minute": 60 * total / wall,
            "load1_at_start": round(load, 2), "load1_at_end": round(os.getloadavg()[0], 2)}


GOLD_ACTIONS = """
import json, sys
from hpl_lightning.envs.base import Task
from hpl_lightning.envs.sciworld import SciWorldEnv, SciWorldSplits, task_id
with SciWorldEnv(sys.argv[1], step_budget=False) as env:
    tids = [task_id(*v) for v in SciWorldSplits.load(sys.argv[1]).variations(sys.argv[2])]
    print(json.dumps({tid: env.gold_actions(Task(tid, "")) for tid in tids}))
"""

PLAY = """
import json, sys, time
from hpl_lightning.envs.sciworld import SciWorldEnv, parse_task_id
episodes = json.loads(open(sys.argv[2]).read())
with SciWorldEnv(sys.argv[1], step_budget=False) as env:
    tasks = {tid: env.task(*parse_task_id(tid)) for tid in episodes}
    t0, steps = time.perf_counter(), 0
    for tid, actions in episodes.items():
        env.reset(tasks[tid])
        for action in actions:
            steps += 1
            if env.step(action).done:
                break
    print(json.dumps({"seconds": time.perf_counter() - t0, "steps": steps}))
"""


def python(code: Path, script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=code, env={**os.environ, "PYTHONPATH": str(code)},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{code}: failed:\n{done.stderr[-3000:]}")
    return done.stdout.splitlines()[-1]


def episodes(code: Path, splits: Path, actions: Path) -> dict:
    """Every variation's fixed actions played from ``reset``, in one simulator."""
    load = os.getloadavg()[0]
    r = json.loads(python(code, PLAY, str(splits), str(actions)))
    return {**r, "steps_per_second": r["steps"] / r["seconds"], "load1_at_start": round(load, 2),
            "load1_at_end": round(os.getloadavg()[0], 2)}


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="0b54b5e", help="the earlier commit")
    parser.add_argument("--split", default="test")
    parser.add_argument("--every", type=int, default=7, help="every N-th variation of the split")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {"before": [], "after": []}
    plays: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        codes = {"before": export(args.before, tmp / "before"), "after": ROOT}
        splits, n = subset(args.split, args.every, tmp)
        actions = tmp / "actions.json"
        actions.write_text(python(ROOT, GOLD_ACTIONS, str(splits), args.split))
        print(f"{n} variations of {args.split} (every {args.every}), {args.workers} worker(s), before = "
              f"{args.before}", flush=True)
        for i in range(args.rounds):
            for label in ("before", "after") if i % 2 == 0 else ("after", "before"):
                r = gold(codes[label], args.split, splits, args.workers)
                runs[label].append(r)
                print(f"round {i + 1} {label:<6} gold {r['matched']}/{r['variations']} matched, {r['steps']} steps "
                      f"in {r['seconds']:.1f} s: {r['steps_per_second']:.2f} steps/s, "
                      f"{r['variations_per_minute']:.2f} variations/min; load1 {r['load1_at_start']} -> "
                      f"{r['load1_at_end']}", flush=True)
                e = episodes(codes[label], splits, actions)
                plays[label].append(e)
                print(f"round {i + 1} {label:<6} episodes {e['steps']} steps in {e['seconds']:.1f} s: "
                      f"{e['steps_per_second']:.2f} steps/s; load1 {e['load1_at_start']} -> {e['load1_at_end']}",
                      flush=True)
    ratios = {m: [a[m] / b[m] for a, b in zip(runs["after"], runs["before"])]
              for m in ("steps_per_second", "variations_per_minute")}
    ratios["episode_steps_per_second"] = [a["steps_per_second"] / b["steps_per_second"]
                                          for a, b in zip(plays["after"], plays["before"])]
    print(f"after/before gold steps/s: {spread(ratios['steps_per_second'])}")
    print(f"after/before gold variations/min: {spread(ratios['variations_per_minute'])}")
    print(f"after/before episode steps/s: {spread(ratios['episode_steps_per_second'])}")
    print(json.dumps({"before": args.before, "split": args.split, "every": args.every, "workers": args.workers,
                      "gold": runs, "episodes": plays, "ratios": ratios}))
    print(f"ratio: {statistics.median(ratios['steps_per_second']):.4f}")


if __name__ == "__main__":
    main()
