"""Episodes per minute of local evaluation (``evaluate.py run``), this checkout against an earlier commit, side by
side in one run on the same tasks, models and machine.

    python benchmarks/evaluation_speed.py                       # vs 81de362 (before the window/stop/budget work)
    python benchmarks/evaluation_speed.py --before HEAD~5 --tasks 4 --policies hpl-tiny

The earlier commit is checked out into a temporary git worktree and run with this environment's Python. Policies:
``hpl-tiny`` (the quickstart's model) and ``smollm2-135m-instruct`` (given to the earlier commit as the converted
model directory, which it loads like any local model). Tasks: the first ``--tasks`` ScienceWorld ``dev`` tasks of
``--task_type`` (lifespan: 10-turn budgets, so a run that never finishes a task is still bounded). A run over
``--limit_minutes`` is stopped and counted by the episodes it finished. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def task_ids(task_type: str, n: int) -> list[str]:
    from hpl_lightning.envs.sciworld import DEFAULT_SPLITS, task_id

    splits = json.loads(Path(DEFAULT_SPLITS).read_text())["splits"]["dev"]
    return [task_id(name, v) for name, v in splits if name == task_type][:n]


def policy_path(name: str) -> str:
    """What both checkouts can load: hpl-tiny by name, SmolLM2 as its converted directory, a path made absolute
    (each checkout runs in its own directory)."""
    from hpl_lightning import models

    if models.gguf_file(name) is not None:
        return models.resolve(name)
    return str(Path(name).resolve()) if Path(name).exists() else name


def evaluate(code: Path, policy: str, ids: list[str], out: Path, limit_minutes: float) -> dict:
    cmd = [sys.executable, "evaluate.py", "run", "--benchmark", "sciworld", "--split", "dev", "--policy", policy,
           "--output_dir", str(out), "--workers", str(len(ids)), "--task_ids", json.dumps(ids)]
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=60 * limit_minutes)
        finished_in_time = done.returncode == 0
        if not finished_in_time:
            print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
    except subprocess.TimeoutExpired:
        finished_in_time = False
    seconds = time.perf_counter() - t0
    path = out / "episodes.jsonl"
    episodes = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    scored = [e for e in episodes if e.get("error") is None]
    turns = sum(e["turns"] for e in scored)
    return {"episodes": len(scored), "turns": turns, "seconds": round(seconds, 1), "completed": finished_in_time,
            "episodes_per_minute": round(60 * len(scored) / seconds, 3), "load1_at_start": round(load, 2),
            "load1_at_end": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="81de362", help="the earlier commit")
    parser.add_argument("--policies", nargs="+", default=["hpl-tiny", "smollm2-135m-instruct"])
    parser.add_argument("--task_type", default="lifespan-longest-lived")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--limit_minutes", type=float, default=10.0)
    args = parser.parse_args()

    ids = task_ids(args.task_type, args.tasks)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), args.before], cwd=ROOT, check=True)
        (tmp / "shared").symlink_to((ROOT.parent / "shared").resolve())  # the data path is <checkout>/../shared
        try:
            for name in args.policies:
                policy = policy_path(name)
                for label, code in (("before", before), ("after", ROOT)):
                    r = evaluate(code, policy, ids, tmp / f"{label}-{name}", args.limit_minutes)
                    results.append({"policy": name, "code": label, **r})
                    print(f"{name:<24} {label:<6} {r['episodes']} episodes ({r['turns']} turns) in {r['seconds']} s:"
                          f" {r['episodes_per_minute']} episodes/min{'' if r['completed'] else ' (stopped)'}"
                          f"  load1 {r['load1_at_start']} -> {r['load1_at_end']}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    for name in args.policies:
        b, a = (next(r for r in results if r["policy"] == name and r["code"] == c) for c in ("before", "after"))
        if b["episodes"] and a["episodes"]:
            print(f"{name}: after/before = {a['episodes_per_minute'] / b['episodes_per_minute']:.2f}x episodes/min")
    print(json.dumps({"tasks": ids, "before": args.before, "results": results}))


if __name__ == "__main__":
    main()
