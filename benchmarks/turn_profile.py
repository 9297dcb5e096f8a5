"""Where one agent turn's time goes with LocalPolicy's recompute path (issue 21): tokenization, prefill, the model
matmuls of the decoding steps, and what ``generate`` adds per step on top of them.

Conversations are the committed evaluation episodes of the ScienceWorld study cut after ``--turn`` observations
(teacher-forced: no simulator runs). Each figure is the median of ``--repeats`` runs, in wall seconds and in this
process's CPU seconds (both threads): on a shared machine the wall time mostly measures the other processes.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/turn_profile.py --model smollm2-135m-instruct --episodes 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from hpl_lightning.policies import LocalPolicy

ROOT = Path(__file__).resolve().parents[1]
CELL = ROOT / "results" / "sciworld-cpu-small" / "stages" / "evaluate" / "eto-s0-dev-3c1979be54" / "episodes.jsonl"


def conversations(n: int, turn: int) -> list[list[dict[str, str]]]:
    """The first ``n`` committed episodes, up to and including the user message after ``turn`` actions."""
    rows = [json.loads(line) for line in CELL.read_text().splitlines()][:n]
    return [r["messages"][: len(r["messages"]) - 2 * (r["turns"] - turn)] for r in rows]


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, float, float]:
    """Median, min and max wall seconds of ``repeats`` calls, and their median CPU seconds."""
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), min(times), max(times), statistics.median(cpu)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--turn", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    policy = LocalPolicy(args.model, max_context=1024, max_new_tokens=args.new_tokens, threads=args.threads)
    torch.set_num_threads(args.threads)
    convs = conversations(args.episodes, args.turn)
    prompts = [policy.prompt_ids(c) for c in convs]
    batch = policy.tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    model, n = policy.model, args.new_tokens
    print(f"{len(prompts)} prompts of {[len(p) for p in prompts]} tokens, {n} new tokens each")

    def prefill():
        return model(**batch, use_cache=True, logits_to_keep=1)

    def steps():  # the bare decoding loop: the same n forward calls generate makes, no logits processing
        out = prefill()
        mask, cache = batch["attention_mask"], out.cache
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        positions = mask.sum(1, keepdim=True)
        for _ in range(n - 1):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True)
            cache, positions = out.cache, positions + 1
            token = out.logits[:, -1].argmax(-1, keepdim=True)

    def generate(stop: bool):
        kwargs = policy._decoding() | {"min_new_tokens": n}  # every sequence runs all n steps: same work as steps()
        if not stop:
            kwargs.pop("stop_strings"), kwargs.pop("tokenizer")
        model.generate(**batch, **kwargs)

    figures = {
        "tokenize": timed(lambda: [policy.prompt_ids(c) for c in convs], args.repeats),
        "prefill": timed(prefill, args.repeats),
        "prefill + bare loop": timed(steps, args.repeats),
        "generate, no stop strings": timed(lambda: generate(False), args.repeats),
        "generate, stop strings": timed(lambda: generate(True), args.repeats),
    }
    for name, (median, low, high, cpu) in figures.items():
        print(f"{name}: {median:.2f} s wall (min {low:.2f}, max {high:.2f}), {cpu:.2f} s CPU", flush=True)
    loop = figures["prefill + bare loop"][3] - figures["prefill"][3]
    print(f"CPU per decoding step: forward {loop / (n - 1) * 1000:.0f} ms, generate's overhead "
          f"{(figures['generate, stop strings'][3] - figures['prefill + bare loop'][3]) / n * 1000:.0f} ms")


if __name__ == "__main__":
    main()
