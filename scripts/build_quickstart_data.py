"""Builds ``data/quickstart/`` from real InterCode-SQL data: recorded gpt-3.5 failures vs expert actions on the real DB.

For tasks (outside IPR/HPL's 200 test tasks) whose recorded gpt-3.5 ReAct episode failed, the expert is the task's
gold query executed on the real database through the environment (so observations and rewards are the environment's):
``[execute[gold], submit]``, or ``[execute[SHOW TABLES], execute[gold], submit]`` for a 3-action group. From that:

- expert trajectories (behaviour cloning), and a trajectory pair: expert vs the recorded failed episode;
- a step pair: after the recorded first action, the expert continuation vs the recorded continuation;
- group pairs of 1, 2 and 3 actions from the same prefix, the rejected group being the recorded agent's next
  actions; a group's value is the environment's reward for its last query (InterCode's per-turn reward), the
  curriculum difficulty is the reward gap.

Run with the server of ``scripts/start_mysql.sh``: ``python scripts/build_quickstart_data.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from hpl_lightning.envs import initial_messages, observation_message, parse_action
from hpl_lightning.envs.intercode_sql import IntercodeSqlEnv
from hpl_lightning.schema import parse_record, to_json, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECORDINGS = ROOT.parent / "shared" / "data" / "intercode_sql" / "gpt-3.5_react_10_turns.json"
OUT = ROOT / "data" / "quickstart"


def play(env: IntercodeSqlEnv, task, turns: list[str]) -> tuple[list[dict[str, str]], list[float]]:
    """Plays agent turns from a fresh episode; returns the messages (observation after every action but a final
    submit) and the reward after each action."""
    env.reset(task)
    messages, rewards = [], []
    for text in turns:
        result = env.step(parse_action(text))
        messages.append({"role": "assistant", "content": text})
        rewards.append(result.reward)
        if result.done:
            break
        messages.append(observation_message(result.observation))
    return messages, rewards


def expert_turns(gold: str, inspect: bool) -> list[str]:
    turns = ["Thought: I should see which tables exist first.\nAction: execute[SHOW TABLES]"] if inspect else []
    turns.append(f"Thought: This query answers the question.\nAction: execute[{gold}]")
    turns.append("Thought: The result answers the question, so I am done.\nAction: submit")
    return turns


def recorded_turns(episode: dict) -> list[str]:
    history = episode["turn_history"]
    return [f"Thought: {t}\nAction: {a}" for t, a in zip(history["thoughts"], history["actions"])]


def build(env: IntercodeSqlEnv, index: int, episode: dict) -> list[dict]:
    task = env.task(index)
    head = initial_messages(env, task)
    agent = recorded_turns(episode)
    rejected_msgs, rejected_rewards = play(env, task, agent)
    expert_msgs, expert_rewards = play(env, task, expert_turns(task.meta["gold"], inspect=False))
    if expert_rewards[-1] < 1.0 or rejected_rewards[-1] >= 1.0:
        return []  # keep only a working expert against a genuinely failed episode
    tid = task.id
    out = [
        {"id": f"{tid}/expert", "task": "intercode_sql", "messages": head + expert_msgs, "reward": 1.0},
        {"id": f"{tid}/traj", "task_id": tid, "level": "trajectory", "prompt": head, "chosen": expert_msgs,
         "rejected": rejected_msgs, "chosen_reward": 1.0, "rejected_reward": rejected_rewards[-1]},
    ]
    # Branch after the agent's first action: replay it, then compare continuations from that state.
    prefix = rejected_msgs[:2]
    if len(agent) >= 3 and len(prefix) == 2:
        suffix_msgs, suffix_rewards = play(env, task, agent[:1] + expert_turns(task.meta["gold"], inspect=False))
        out.append({"id": f"{tid}/step1", "task_id": tid, "level": "step", "prompt": head + prefix,
                    "chosen": suffix_msgs[2:], "rejected": rejected_msgs[2:], "chosen_reward": suffix_rewards[-1],
                    "rejected_reward": rejected_rewards[-1]})
    for length in (1, 2, 3):
        expert = expert_turns(task.meta["gold"], inspect=length == 3)[:length]
        chosen_msgs, chosen_rewards = play(env, task, expert)
        if len(agent) < length:
            continue
        group_msgs, group_rewards = play(env, task, agent[:length])
        if len(group_rewards) < length:
            continue
        # a group's value: the reward of submitting right after it (InterCode's per-turn reward of the last query)
        chosen_value = chosen_rewards[-1] if expert[-1].endswith("submit") else _submit_value(env, task, expert)
        rejected_value = _submit_value(env, task, agent[:length])
        gap = round(chosen_value - rejected_value, 4)
        if gap <= 0:
            continue
        out.append({"id": f"{tid}/group{length}", "task_id": tid, "level": "group", "prompt": head,
                    "chosen": _strip_last_observation(chosen_msgs), "rejected": _strip_last_observation(group_msgs),
                    "chosen_reward": chosen_value, "rejected_reward": rejected_value, "group_length": length,
                    "difficulty": gap})
    return out


def _submit_value(env: IntercodeSqlEnv, task, turns: list[str]) -> float:
    return play(env, task, turns + ["Action: submit"])[1][-1]


def _strip_last_observation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return messages[:-1] if messages and messages[-1]["role"] == "user" else messages


def main(n_train: int = 12, n_val: int = 4, seed: int = 0) -> None:
    episodes = json.loads(RECORDINGS.read_text())
    with IntercodeSqlEnv() as env:
        train_tasks = [t.meta["index"] for t in env.tasks("train")]
        failed = [i for i in train_tasks if episodes[str(i)]["summary"]["max_reward"] < 1.0
                  and len(episodes[str(i)]["turn_history"]["actions"]) >= 3]
        random.Random(seed).shuffle(failed)
        splits: dict[str, list[dict]] = {"train": [], "val": []}
        for index in failed:
            split = "train" if len(splits["train"]) < n_train * 6 else "val"
            if split == "val" and len(splits["val"]) >= n_val * 6:
                break
            records = build(env, index, episodes[str(index)])
            splits[split].extend(records)
    OUT.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        for r in records:
            parse_record(r)  # the data contract, before anything is written
        write_jsonl(OUT / f"{split}.jsonl", records)
        levels = {}
        for r in records:
            levels[r.get("level", "bc")] = levels.get(r.get("level", "bc"), 0) + 1
        print(f"{split}: {len(records)} records {levels}")


if __name__ == "__main__":
    main()
