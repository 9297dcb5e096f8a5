"""Episodes per minute of the prefix-cache engine and the recompute engine, side by side (issue 21).

``--stage evaluate`` (default): both engines play the same ScienceWorld evaluation episodes with the same number in
flight, alternating (the order flips every repeat), in one process. Episodes are distinct committed episodes of
``results/sciworld-cpu-small`` (10 turns each), teacher-forced: each turn's conversation is the committed one up to
that observation, so both engines see the same prompts and no simulator runs (its cost: docs/evaluation-speed.md).
Each run starts with empty caches, so the per-run setup (encoding the shared prefix) is counted. Then the
teacher-forced agreement with the past: the committed episodes of the ``sft`` arm, seed 0 (dev and test), fed turn
by turn to the same SFT model; each engine's greedy action is compared with the other's and with the committed one.

``--stage explore``: a real exploration stage (``pipeline.explore``, simulators included) from the study's expert
trajectories at the paper's M = 5, once per engine per repeat; rollouts per minute. Samples differ between the
engines (per-request vs per-batch seeds), so the two do not run the very same rollouts: the tokens generated are
printed beside the rates.

``prefill_per_unique``: context tokens the prefix-cache engine fed to the model / distinct token prefixes of all its
prompts (what an engine computing each context token once computes). The model is the study's seed-0 SFT'd
SmolLM2-135M, built once with the experiment runner into ``runs/benchmarks/rollout-sft`` (~2 minutes idle).

    PYTHONPATH=$PWD python benchmarks/rollout_speed.py                    # 16 and 4 in flight; last line: ratio
    PYTHONPATH=$PWD python benchmarks/rollout_speed.py --stage explore --in_flight 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from hpl_lightning import pipeline
from hpl_lightning.explore import ExploreConfig
from hpl_lightning.policies import Conversation, LocalPolicy
from hpl_lightning.prefix_cache import PrefixCachePolicy, local_policy

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "configs" / "experiments" / "sciworld-cpu-small.yaml"
EVALUATIONS = ROOT / "results" / "sciworld-cpu-small" / "stages" / "evaluate"
BUILT = ROOT / "runs" / "benchmarks" / "rollout-sft"
ENGINES = ("recompute", "prefix-cache")


def sft_model() -> Path:
    """The study's seed-0 SFT model: built with the experiment runner on first use, then reused."""
    found = sorted(BUILT.glob("sft/sft0-*/model/config.json"))
    if not found:
        from hpl_lightning.experiment.command import main as run_experiment

        run_experiment(["-c", str(STUDY), "--seeds", "[0]", "--output_dir", str(BUILT), "--results_dir", str(BUILT),
                        "--stop_before", "segment"])
        found = sorted(BUILT.glob("sft/sft0-*/model/config.json"))
    return found[0].parent


def committed(cells: str, turns: int | None = None, n: int | None = None
              ) -> list[tuple[list[Conversation], list[str]]]:
    """Per committed episode of the evaluation cells matching ``cells``: its conversation at each turn (ending with
    the observation) and the action it took there. With ``turns``: distinct episodes of at least ``turns`` turns,
    cut to their first ``turns`` (the first ``n`` of them)."""
    rows, seen = [], set()
    for path in sorted(EVALUATIONS.glob(f"{cells}/episodes.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            head = len(row["messages"]) - 2 * row["turns"]
            length = row["turns"] if turns is None else turns
            key = json.dumps(row["messages"][: head + 2 * length])
            if turns is None or (row["turns"] >= turns and key not in seen):
                seen.add(key)
                rows.append((row["messages"], head, length))
    if n is not None and len(rows) < n:
        raise SystemExit(f"{EVALUATIONS}/{cells} holds {len(rows)} distinct episodes of {turns}+ turns, not {n}")
    return [([m[: h + 2 * t] for t in range(k)], [m[h + 2 * t]["content"] for t in range(k)])
            for m, h, k in rows[:n]]


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
    """Seconds to run all episodes in lock step, and each turn's texts (starting from empty caches)."""
    if isinstance(policy, PrefixCachePolicy):
        policy.clear()
        policy.prefilled = 0
    start, texts = time.perf_counter(), []
    for turn in range(max(len(p) for p in plays)):
        texts.append(policy.generate([p[turn] for p in plays if turn < len(p)]))
    return time.perf_counter() - start, texts


def alternate(repeats: int, run: Callable[[str], float]) -> dict[str, list[float]]:
    """Seconds of ``run(engine)`` for both engines, ``repeats`` times, the order flipping every repeat."""
    times: dict[str, list[float]] = {e: [] for e in ENGINES}
    for repeat in range(repeats):
        for engine in ENGINES if repeat % 2 == 0 else ENGINES[::-1]:
            times[engine].append(run(engine))
    return times


def rates(label: str, per_run: int, unit: str, times: dict[str, list[float]]) -> float:
    """Prints each engine's rate (``per_run`` units per run; median of the runs, with the spread); returns the
    ratio of the rates."""
    per_minute = {}
    for engine, seconds in times.items():
        per_minute[engine] = per_run / statistics.median(seconds) * 60
        print(f"{label}, {engine}: {per_minute[engine]:.2f} {unit}/min (median {statistics.median(seconds):.2f} s "
              f"per {per_run} {unit}, min {min(seconds):.2f}, max {max(seconds):.2f}, {len(seconds)} runs)",
              flush=True)
    ratio = per_minute["prefix-cache"] / per_minute["recompute"]
    print(f"{label}: prefix-cache / recompute = {ratio:.2f}x", flush=True)
    return ratio


def evaluation(args: argparse.Namespace, policies: dict[str, LocalPolicy], n: int) -> float:
    """Both engines on ``n`` teacher-forced episodes in flight; returns the ratio of their episodes per minute."""
    plays = [conversations for conversations, _ in committed("*", args.turns, n)]
    outputs: dict[str, list[list[str]]] = {}

    def run(engine: str) -> float:
        seconds, outputs[engine] = play(policies[engine], plays)
        return seconds

    times = alternate(args.repeats, run)
    pairs = [(a, b) for ta, tb in zip(outputs["recompute"], outputs["prefix-cache"]) for a, b in zip(ta, tb)]
    prompts = [policies["prefix-cache"].prompt_ids(c) for p in plays for c in p]
    cached = policies["prefix-cache"]
    print(f"{n} in flight: greedy texts of the two engines equal at {sum(a == b for a, b in pairs)} of {len(pairs)} "
          f"turns (last repeat)")
    print(f"{n} in flight: context tokens prefilled by recompute {sum(map(len, prompts))}, by prefix-cache "
          f"{cached.prefilled}, unique {unique_tokens(prompts)}")
    print(f"prefill_per_unique: {cached.prefilled / unique_tokens(prompts):.3f}", flush=True)
    return rates(f"{n} in flight", n, "episodes", times)


def agreement(policies: dict[str, LocalPolicy]) -> None:
    """Teacher-forced: each engine's greedy action at every turn of the committed sft seed-0 episodes (both cells,
    every episode at its own length)."""
    episodes = committed("sft0-*")
    plays = [p for p, _ in episodes]
    turns = max(map(len, plays))
    past = [[a[t] for _, a in episodes if t < len(a)] for t in range(turns)]
    actions = {engine: play(policy, plays)[1] for engine, policy in policies.items()}
    same = [sum(a == b for a, b in zip(ta, tb)) for ta, tb in zip(actions["recompute"], actions["prefix-cache"])]
    total = sum(map(len, past))
    print(f"teacher-forced, the {len(plays)} committed episodes of sft seed 0 (dev, test), {total} turns: "
          f"prefix-cache = recompute at {sum(same)} (per turn: {same})")
    for engine, texts in actions.items():
        hits = [sum(a == b for a, b in zip(tx, px)) for tx, px in zip(texts, past)]
        print(f"  {engine} = the committed action at {sum(hits)} of {total} turns (per turn: {hits})", flush=True)


def exploration(args: argparse.Namespace, model: Path, n: int) -> float:
    """A real exploration stage per engine (M = ``--mc_samples``); returns the ratio of rollouts per minute."""
    study = yaml.safe_load(STUDY.read_text())["exploration"]
    config = replace(ExploreConfig(**study["config"]), levels=("trajectory", "step"), mc_samples=args.mc_samples)
    experts = sorted(BUILT.glob("experts/*/experts.jsonl"))[0]
    splits = sorted(BUILT.glob("splits-*.json"))[0]  # the study's protocol (ETO's step budgets), as the runner cut it
    created: list[LocalPolicy] = []
    prompts: list[list[int]] = []
    make = pipeline.make_policies

    def recording(*a: Any, **kw: Any) -> dict[bool, Any]:  # the engine's policies, with every prompt they get
        made = make(*a, **kw)
        for policy in made.values():
            created.append(policy)
            generate = policy.generate
            policy.generate = lambda convs, keys=None, p=policy, g=generate: \
                prompts.extend(p.prompt_ids(c) for c in convs) or g(convs, keys)
        return made

    pipeline.make_policies = recording

    def run(engine: str) -> float:
        created.clear()
        prompts.clear()
        with tempfile.TemporaryDirectory() as out:
            summary = pipeline.explore(str(experts), f"{out}/rollouts.jsonl", "sciworld", config, str(model), None,
                                       n, args.explore_tasks, None, study["max_new_tokens"], study["temperature"],
                                       n, args.threads, 0, "float32", "cpu", env_kwargs={"splits": str(splits)},
                                       progress=False, engine=engine)
            generated = [json.loads(line) for line in Path(f"{out}/rollouts.jsonl").read_text().splitlines()]
        if engine == "prefix-cache":
            fed = sum(p.prefilled for p in created)
            print(f"prefix-cache run: prefill_per_unique: {fed / unique_tokens(prompts):.3f} ({fed} of "
                  f"{sum(map(len, prompts))} prompt tokens, {unique_tokens(prompts)} unique)")
        print(f"{engine}: {summary['rollouts']} rollouts, {sum(len(r['actions']) for r in generated)} actions in "
              f"{summary['wall_seconds']:.1f} s; generate {summary['seconds'].get('generate', 0):.1f} s, env step "
              f"{summary['seconds'].get('step', 0):.1f} s, restore {summary['seconds'].get('restore', 0):.1f} s",
              flush=True)
        return summary["wall_seconds"] / summary["rollouts"]

    times = alternate(args.repeats, run)
    return rates(f"{n} in flight", 1, "rollouts", times)  # seconds per rollout, so rollouts per minute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["evaluate", "explore"], default="evaluate")
    parser.add_argument("--model", default=None, help="default: the study's seed-0 SFT model, built once")
    parser.add_argument("--in_flight", type=int, nargs="+", default=[4, 16], help="the last one gives `ratio`")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_context", type=int, default=1024, help="the study's window")
    parser.add_argument("--mc_samples", type=int, default=5, help="explore: M (the paper's 5)")
    parser.add_argument("--explore_tasks", type=int, default=None, help="explore: the first N expert trajectories")
    args = parser.parse_args()
    model = Path(args.model) if args.model else sft_model()
    torch.set_num_threads(args.threads)
    if args.stage == "explore":
        ratios = [exploration(args, model, n) for n in args.in_flight]
    else:
        kwargs = dict(max_context=args.max_context, max_new_tokens=40, threads=args.threads)
        policies = {e: local_policy(str(model), e, **kwargs) for e in ENGINES}
        ratios = [evaluation(args, policies, n) for n in args.in_flight]
        agreement(policies)
    for n, ratio in zip(args.in_flight, ratios):
        print(f"{n} in flight: prefix-cache / recompute = {ratio:.2f}x")
    print(f"ratio: {ratios[-1]:.3f}")


if __name__ == "__main__":
    main()
