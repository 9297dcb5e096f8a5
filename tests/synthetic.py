"""Synthetic multi-turn ReAct data in the data contract, for tests that need every level without an environment."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "select name from singer where age count order by country stadium concert year id table join group".split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def head(rng: random.Random, task: int) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": "You are a SQL agent. Answer with Thought: and Action: lines."},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": f"Task {task}: {_sentence(rng, 6)}"},
    ]


def turns(rng: random.Random, n_actions: int, final_observation: bool = True) -> list[dict[str, str]]:
    out = []
    for i in range(n_actions):
        out.append({"role": "assistant", "content": f"Thought: {_sentence(rng, 3)}\nAction: execute[{_sentence(rng, 4)}]"})
        if final_observation or i < n_actions - 1:
            out.append({"role": "user", "content": f"Observation: {_sentence(rng, 5)}"})
    return out


def make_records(n_tasks: int = 4, seed: int = 0, group_lengths=(1, 2, 3, 5), gaps=(0.9, 0.5, 0.2)) -> list[dict]:
    """Per task: one expert trajectory, one trajectory pair, one step pair, and group pairs spanning the buckets."""
    rng = random.Random(seed)
    records = []
    for t in range(n_tasks):
        h = head(rng, t)
        expert = turns(rng, 6)
        records.append({"id": f"bc-{t}", "task": f"intercode_sql/{t}", "messages": h + expert, "reward": 1.0})
        records.append({
            "id": f"traj-{t}", "task_id": f"intercode_sql/{t}", "level": "trajectory", "prompt": h, "chosen": expert,
            "rejected": turns(rng, 4), "chosen_reward": 1.0, "rejected_reward": 0.0,
        })
        records.append({
            "id": f"step-{t}", "task_id": f"intercode_sql/{t}", "level": "step", "prompt": h + expert[:4], "chosen": expert[4:],
            "rejected": turns(rng, 2), "chosen_reward": 1.0, "rejected_reward": 0.3,
        })
        for g, length in enumerate(group_lengths):
            gap = gaps[(t + g) % len(gaps)]
            records.append({
                "id": f"group-{t}-{g}", "task_id": f"intercode_sql/{t}", "level": "group", "prompt": h + expert[:2],
                "chosen": turns(rng, length, final_observation=False),
                "rejected": turns(rng, length, final_observation=False),
                "chosen_reward": 1.0, "rejected_reward": round(1.0 - gap, 3), "group_length": length,
                "difficulty": gap,
            })
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
