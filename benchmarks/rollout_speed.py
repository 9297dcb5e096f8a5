"""Episodes per minute of LocalPolicy's recompute path and PrefixCachePolicy, side by side (issue 21).

Both paths play the same episodes with the same number in flight, alternating (the order flips every repeat), in
one process. Episodes are the committed ScienceWorld evaluation episodes of ``results/sciworld-cpu-small``,
teacher-forced: each turn's conversation is the committed one up to that observation, so both paths see the same
prompts and no simulator runs (its cost is in docs/evaluation-speed.md). The cache path starts every run empty, so
its per-run setup (encoding the shared prefix) is counted. Greedy texts of both paths are compared turn by turn.
``prefill_per_unique``: context tokens the cache path fed to the model / distinct token prefixes of all its prompts.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/rollout_speed.py --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hpl_lightning.policies import Conversation, LocalPolicy
from hpl_lightning.prefix_cache import PrefixCachePolicy

ROOT = Path(__file__).resolve().parents[1]
CELL = ROOT / "results" / "sciworld-cpu-small" / "stages" / "evaluate" / "eto-s0-dev-3c1979be54"


def episodes(n: int, turns: int) -> list[list[Conversation]]:
    """Per episode, its conversation at each of its first ``turns`` turns (ending with the observation)."""
    rows = [json.loads(line) for line in (CELL / "episodes.jsonl").read_text().splitlines()]
    rows = [rows[i % len(rows)] for i in range(n)]  # more episodes than the cell holds: repeat (same cost)
    head = [len(r["messages"]) - 2 * r["turns"] for r in rows]
    return [[r["messages"][: h + 2 * t] for t in range(min(turns, r["turns"]))] for r, h in zip(rows, head)]


def unique_tokens(prompts: list[list[int]]) -> int:
    """Distinct token prefixes of ``prompts``: what an engine that computes each context token once computes."""
    seen: set[int] = set()
    for ids in prompts:
        h = 0
        for token in ids:
            h = hash((h, token))
            seen.add(h)
    return len(seen)


def play(policy: LocalPolicy, plays: list[list[Conversation]]) -> tuple[float, list[list[str]]]:
    """Seconds to run all episodes in lock step, and each turn's texts."""
    if isinstance(policy, PrefixCachePolicy):
        policy.clear()
        policy.prefilled = 0
    start, texts = time.perf_counter(), []
    for turn in range(max(len(p) for p in plays)):
        texts.append(policy.generate([p[turn] for p in plays if turn < len(p)]))
    return time.perf_counter() - start, texts


def compare(args: argparse.Namespace, recompute: LocalPolicy, cached: PrefixCachePolicy, n: int) -> float:
    """Prints both paths' rates at ``n`` episodes in flight; returns the ratio of the medians."""
    plays = episodes(n, args.turns)
    times: dict[str, list[float]] = {"recompute": [], "prefix-cache": []}
    agree = total = 0
    for repeat in range(args.repeats):
        order = [("recompute", recompute), ("prefix-cache", cached)]
        outputs = {}
        for name, policy in order if repeat % 2 == 0 else order[::-1]:
            seconds, outputs[name] = play(policy, plays)
            times[name].append(seconds)
        pairs = [(a, b) for ta, tb in zip(outputs["recompute"], outputs["prefix-cache"]) for a, b in zip(ta, tb)]
        agree, total = agree + sum(a == b for a, b in pairs), total + len(pairs)
    prompts = [cached.prompt_ids(c) for p in plays for c in p]
    rates = {}
    for name, seconds in times.items():
        rates[name] = n / statistics.median(seconds) * 60
        print(f"{n} in flight, {name}: {rates[name]:.2f} episodes/min (median {statistics.median(seconds):.1f} s, "
              f"min {min(seconds):.1f}, max {max(seconds):.1f}, {len(seconds)} runs)")
    print(f"{n} in flight: greedy texts equal at {agree} of {total} turns")
    print(f"{n} in flight: recompute prefills {sum(map(len, prompts))} tokens, prefix-cache {cached.prefilled}, "
          f"unique {unique_tokens(prompts)}")
    print(f"prefill_per_unique: {cached.prefilled / unique_tokens(prompts):.3f}")
    return rates["prefix-cache"] / rates["recompute"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--in_flight", type=int, nargs="+", default=[4, 16], help="the last one gives `ratio`")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_context", type=int, default=1024, help="the study's window (hpl-tiny needs ~2048)")
    args = parser.parse_args()
    kwargs = dict(max_context=args.max_context, max_new_tokens=40, threads=args.threads)
    recompute, cached = LocalPolicy(args.model, **kwargs), PrefixCachePolicy(args.model, **kwargs)
    torch.set_num_threads(args.threads)
    ratios = [compare(args, recompute, cached, n) for n in args.in_flight]
    for n, ratio in zip(args.in_flight, ratios):
        print(f"{n} in flight: prefix-cache / recompute = {ratio:.2f}x")
    print(f"ratio: {ratios[-1]:.3f}")


if __name__ == "__main__":
    main()
