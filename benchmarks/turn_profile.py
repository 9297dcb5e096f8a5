"""Where a turn's time goes, per engine (issue 21): tokenization, prefill forwards, decoding forwards, and the rest
(``generate``'s or the decoding loop's per-step work: logits processing, stop strings, cache bookkeeping).

Both engines play the same teacher-forced ScienceWorld episodes as ``rollout_speed.py`` (distinct committed
10-turn episodes of the study, ``--in_flight`` at a time, the study's seed-0 SFT model, 1,024-token window,
40 new tokens, greedy). A forward that feeds more than one token per row is prefill, one token is a decoding step;
both are timed by wrapping the model's ``forward``. Each figure is the sum over the run, in wall seconds; the
engines alternate over ``--repeats`` runs and the medians are printed. The simulator's share is in
``rollout_speed.py --stage explore`` (env step and restore seconds).

    PYTHONPATH=$PWD python benchmarks/turn_profile.py --in_flight 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from hpl_lightning.policies import LocalPolicy
from hpl_lightning.prefix_cache import local_policy
from rollout_speed import ENGINES, committed, play, sft_model


def instrument(policy: LocalPolicy, spent: Counter) -> None:
    """Adds the seconds of every forward (prefill or decoding step) and of every tokenization to ``spent``."""
    forward, prompt_ids = policy.model.forward, policy.prompt_ids

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        out = forward(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        spent["prefill" if ids.shape[1] > 1 else "decoding steps"] += time.perf_counter() - start
        spent["prefill forwards" if ids.shape[1] > 1 else "decoding forwards"] += 1
        return out

    def timed_prompt_ids(conversation):
        start = time.perf_counter()
        ids = prompt_ids(conversation)
        spent["tokenization"] += time.perf_counter() - start
        return ids

    policy.model.forward, policy.prompt_ids = timed_forward, timed_prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the study's seed-0 SFT model (rollout_speed.py)")
    parser.add_argument("--in_flight", type=int, default=16)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = Path(args.model) if args.model else sft_model()
    torch.set_num_threads(args.threads)
    plays = [p for p, _ in committed("*", args.turns, args.in_flight)]
    runs: dict[str, list[Counter]] = {e: [] for e in ENGINES}
    policies = {e: local_policy(str(model), e, max_context=1024, max_new_tokens=40, threads=args.threads)
                for e in ENGINES}
    for repeat in range(args.repeats):
        for engine in ENGINES if repeat % 2 == 0 else ENGINES[::-1]:
            spent: Counter = Counter()
            instrument(policies[engine], spent)
            spent["total"], _ = play(policies[engine], plays)
            runs[engine].append(spent)
            del policies[engine].model.forward, policies[engine].prompt_ids  # the classes' methods again
    print(f"{args.in_flight} episodes x {args.turns} teacher-forced turns, median of {args.repeats} runs (wall s):")
    parts = ["tokenization", "prefill", "decoding steps"]
    for engine, spent in runs.items():
        median = {k: statistics.median(s[k] for s in spent) for k in [*parts, "total"]}
        rest = median["total"] - sum(median[k] for k in parts)
        counts = {k: statistics.median(s[k] for s in spent) for k in ("prefill forwards", "decoding forwards")}
        print(f"{engine:>12}: total {median['total']:.1f} = " + ", ".join(f"{k} {median[k]:.1f}" for k in parts)
              + f", rest {rest:.1f}  ({counts['prefill forwards']:.0f} prefill forwards, "
              f"{counts['decoding forwards']:.0f} decoding forwards: "
              f"{1000 * median['decoding steps'] / max(counts['decoding forwards'], 1):.0f} ms each)")


if __name__ == "__main__":
    main()
