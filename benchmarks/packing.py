"""Shared-prefix packing vs per-pair on full HPL data, one task per batch (its trajectory, step and group pairs and
its expert trajectory): tokens computed per unique token and wall time of a training step (policy forward and
backward, reference forward), side by side.

Data: the bundled real InterCode-SQL pairs (``data/quickstart``: the gold query vs wrong queries in the same words,
every observation from the environment), and, when given (``--sciworld gold.jsonl`` from
``hpl_lightning.envs.sciworld.gold_experts``), ScienceWorld pairs with long trunks built on the real gold trajectories
whose rejected branches are SYNTHETIC: real actions and observations of the same trajectory in another order (no
policy rollouts were available). "Unique tokens" are the distinct token prefixes of a batch (the trie's nodes).
The two layouts alternate over ``--repeats`` rounds in one process (the first side alternating too) and each
dataset reports its median per-pair / packed time ratio with the spread. Last lines: ``tokens_per_unique`` (packed
computed tokens, padding included, per unique token) and ``ratio`` (median over rounds of per-pair over packed wall
time, all datasets together).

    python benchmarks/packing.py [--sciworld /tmp/sw/gold.jsonl] [--pairs data/quickstart-sciworld/train.jsonl]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import QUICKSTART, read_records, small_qwen2  # noqa: E402
from hpl_lightning.data import collate  # noqa: E402
from hpl_lightning.models import load_tokenizer  # noqa: E402
from hpl_lightning.module import HPLModule  # noqa: E402
from hpl_lightning.schema import parse_pair, parse_trajectory  # noqa: E402
from hpl_lightning.tokenization import ChatTokenizer, Example, TokenizationReport, head_length  # noqa: E402


def sciworld_records(path: Path, seed: int = 0, max_steps_per_task: int = 4) -> list[dict]:
    """Trajectory, step and group pairs on each gold trajectory; rejected branches are synthetic (see module doc)."""
    rng = random.Random(seed)
    records = []
    for expert in read_records([path]):
        messages = expert["messages"]
        h = head_length(messages)
        head, turns = messages[:h], messages[h:]
        n_actions = len(turns) // 2
        task = expert["id"]
        fake = lambda k: [m for i in rng.sample(range(n_actions), min(k, n_actions)) for m in turns[2 * i: 2 * i + 2]]  # noqa: E731
        records.append({"id": f"{task}/expert", "task": "sciworld", "messages": messages, "reward": 1.0})
        records.append({"id": f"{task}/traj", "task_id": task, "level": "trajectory", "prompt": head,
                        "chosen": turns, "rejected": fake(n_actions // 2), "chosen_reward": 1.0,
                        "rejected_reward": 0.0})
        for s in sorted(rng.sample(range(1, n_actions - 1), min(max_steps_per_task, n_actions - 2))):
            prompt = head + turns[: 2 * s]
            records.append({"id": f"{task}/step{s}", "task_id": task, "level": "step", "prompt": prompt,
                            "chosen": turns[2 * s:], "rejected": fake(3), "chosen_reward": 1.0,
                            "rejected_reward": 0.2})
            g = rng.choice([1, 2, 3])
            records.append({"id": f"{task}/group{s}", "task_id": task, "level": "group", "prompt": prompt,
                            "chosen": turns[2 * s: 2 * s + 2 * g - 1], "rejected": fake(g)[:-1],
                            "chosen_reward": 1.0, "rejected_reward": 0.3, "group_length": g, "difficulty": 0.7})
    return records


def task_batches(records: list[dict], max_length: int) -> list[list[Example]]:
    """Tokenized examples grouped by task (an expert trajectory joins the pairs whose id prefix it shares)."""
    chat = ChatTokenizer(load_tokenizer("hpl-tiny"), max_length)
    report = TokenizationReport()
    groups: dict[str, list[Example]] = defaultdict(list)
    for i, r in enumerate(records, 1):
        record = parse_trajectory(r) if "messages" in r else parse_pair(r)
        key = r["task_id"] if "task_id" in r else r["id"].rsplit("/", 1)[0]
        groups[key].append(chat(record, report, "mem", i))
    return list(groups.values())


def measure(module: HPLModule, batches: list[dict]) -> float:
    """Wall time of training steps (forward, loss, backward) over all batches."""
    start = time.perf_counter()
    for batch in batches:
        module.policy.zero_grad()
        module._step(batch, "val").backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sciworld", type=Path, help="gold trajectories (JSONL) of ScienceWorld")
    parser.add_argument("--pairs", type=Path, action="append", default=[],
                        help="more real HPL data (JSONL in the data contract), e.g. data/quickstart-sciworld/train.jsonl")
    parser.add_argument("--no-intercode", action="store_true", help="skip the bundled InterCode-SQL pairs")
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--max-tasks", type=int, help="only the first N tasks of each dataset (a loaded machine)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of per-pair and packed")
    args = parser.parse_args()
    datasets = {} if args.no_intercode else {"intercode_sql (real pairs)": read_records(QUICKSTART)}
    for path in args.pairs:
        datasets[f"{path} (real pairs)"] = read_records([path])
    if args.sciworld:
        datasets["sciworld (gold trunks, synthetic rejected)"] = sciworld_records(args.sciworld)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(small_qwen2(Path(tmp) / "model", hidden=128, layers=2))
        modules = {p: HPLModule(policy=model, packing=p) for p in (False, True)}
        for m in modules.values():
            m.configure_model()
        totals: dict[str, float] = defaultdict(float)
        times: dict[str, dict[bool, list[float]]] = defaultdict(lambda: {False: [], True: []})
        for name, records in datasets.items():
            groups = task_batches(records, args.max_length)[: args.max_tasks]
            items = [[(ex, False) for ex in g] for g in groups]
            per_pair = [collate(i, 0) for i in items]
            packed = [collate(i, 0, packing=True) for i in items]
            figures = {
                "per_pair_tokens": sum(b["input_ids"].numel() for b in per_pair),
                "per_pair_real_tokens": sum(int(b["attention_mask"].sum()) for b in per_pair),
                "packed_tokens": sum(b["input_ids"].numel() for b in packed),
                "unique_tokens": sum(b["n_unique"] for b in packed),
            }
            for key in ("packed_tokens", "unique_tokens"):
                totals[key] += figures[key]
            for r in range(args.repeats):  # alternating, the side that goes first alternating too
                for packing in ((False, True) if r % 2 == 0 else (True, False)):
                    times[name][packing].append(measure(modules[packing], packed if packing else per_pair))
            ratios = [a / b for a, b in zip(times[name][False], times[name][True])]
            n_pairs = sum(b["n_pairs"] for b in packed)
            print(f"{name}: {len(groups)} tasks, {n_pairs} pairs; per-pair computes "
                  f"{figures['per_pair_tokens'] / figures['unique_tokens']:.2f} tokens per unique token "
                  f"({figures['per_pair_real_tokens'] / figures['unique_tokens']:.2f} without padding), packed "
                  f"{figures['packed_tokens'] / figures['unique_tokens']:.3f}; step time per-pair "
                  f"{statistics.median(times[name][False]):.2f}s, packed {statistics.median(times[name][True]):.2f}s "
                  f"(median of {args.repeats}); ratio {statistics.median(ratios):.2f}x "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f}); load {os.getloadavg()[0]:.1f}", flush=True)
    rounds = [sum(times[n][False][r] for n in times) / sum(times[n][True][r] for n in times)
              for r in range(args.repeats)]
    print(f"torch threads {torch.get_num_threads()}, model small Qwen2 (hidden 128, 2 layers), fp32, CPU")
    print(f"tokens_per_unique: {totals['packed_tokens'] / totals['unique_tokens']:.4f}")
    print(f"ratio: {statistics.median(rounds):.4f}")


if __name__ == "__main__":
    main()
