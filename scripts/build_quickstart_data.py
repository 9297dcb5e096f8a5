"""Builds ``data/quickstart/`` from real InterCode-SQL data: expert vs wrong SQL in the same words, on the real DB.

Every assistant turn, chosen or rejected, is written in one template (``Thought: This query answers the question.``
and so on), so the two sides of a pair differ only in the SQL they run: a pair cannot be told apart by surface form
(the recorded gpt-3.5 episodes' free-form thoughts against templated expert thoughts did that, and a random-init model
scored every validation pair right after 3 steps). For tasks (outside IPR/HPL's 200 test tasks) whose recorded
gpt-3.5 ReAct episode failed:

- the expert runs the task's gold query: ``[execute[gold], submit]``, or ``[execute[SHOW TABLES], execute[gold],
  submit]`` for a 3-action group;
- a wrong query is either one of the recorded agent's failed attempts (its SQL, without its words) or another train
  task's gold query on the same database (the right query for another question, checked to score below 1 here);
- every episode, chosen and rejected, is played through the environment on the real database, so observations
  (result rows or the server's error) and rewards are the environment's.

From each task: an expert trajectory (behaviour cloning); a trajectory pair, expert vs a wrong query; a step pair
after the expert's ``SHOW TABLES``, gold vs a wrong query; group pairs of 1, 2 and 3 actions from the start, expert vs
a wrong query. The two sources alternate between tasks, so every level holds both kinds: for even tasks the
trajectory, group-1 and group-3 pairs take the agent's final, first and final attempt and the step and group-2 pairs
other tasks' gold queries; odd tasks swap the sources (a source missing for a task is replaced by the other). Agent
attempts can also differ in SQL style (gpt-3.5 writes ``COUNT(*) AS n``, Spider's gold ``T1`` aliases), which a small
model picks up quickly; another question's gold query differs only in what it answers. A group's value is the
environment's reward for submitting right after it (InterCode's per-turn reward of its last query); the curriculum
difficulty is the reward gap. Queries are written on one line with no space before commas on both sides (Spider's gold
writes ``a , b``, a form no agent writes).

Run with the server of ``scripts/start_mysql.sh``: ``python scripts/build_quickstart_data.py``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from hpl_lightning.envs import initial_messages, observation_message, parse_action
from hpl_lightning.envs.intercode_sql import IntercodeSqlEnv
from hpl_lightning.schema import parse_record, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
RECORDINGS = ROOT.parent / "shared" / "data" / "intercode_sql" / "gpt-3.5_react_10_turns.json"
OUT = ROOT / "data" / "quickstart"
INSPECT = "Thought: I should see which tables exist first.\nAction: execute[SHOW TABLES]"
SUBMIT = "Thought: The result answers the question, so I am done.\nAction: submit"


def normalize_sql(sql: str) -> str:
    """One line (an action is read up to the end of its line), no space before commas, no trailing ``;``."""
    return re.sub(r"\s+,", ",", " ".join(sql.split())).rstrip(";").rstrip()


def query_turn(sql: str) -> str:
    return f"Thought: This query answers the question.\nAction: execute[{normalize_sql(sql)}]"


def agent_queries(episode: dict) -> list[str]:
    """The recorded agent's distinct answer attempts: its ``execute[...]`` SQL that reads data, in order (schema
    look-ups such as SHOW TABLES/DESC and prose inside ``execute[...]`` are left out)."""
    out: list[str] = []
    for action in episode["turn_history"]["actions"]:
        match = re.fullmatch(r"\s*execute\[(.*)\]\s*", action, re.S)
        sql = normalize_sql(match.group(1)) if match else ""
        if re.match(r"(SELECT|WITH)\b", sql, re.I) and sql not in out:
            out.append(sql)
    return out


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


def submit_value(env: IntercodeSqlEnv, task, turns: list[str]) -> float:
    """The reward of submitting right after ``turns`` (a finished episode's own reward)."""
    return play(env, task, turns if turns[-1] == SUBMIT else turns + [SUBMIT])[1][-1]


def _strip_last_observation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return messages[:-1] if messages and messages[-1]["role"] == "user" else messages


def build(env: IntercodeSqlEnv, task, attempts: list[str], others: list[str], swap: bool) -> list[dict]:
    """The records of one task; ``attempts``: the agent's failed queries, ``others``: other tasks' gold queries;
    ``swap`` exchanges which levels take which source."""
    gold, tid, head = task.meta["gold"], task.id, initial_messages(env, task)
    attempts = [q for q in attempts if submit_value(env, task, [query_turn(q)]) < 1.0]
    others = [q for q in others if submit_value(env, task, [query_turn(q)]) < 1.0][:2]
    if not attempts and not others:
        return []
    attempts, others = attempts or others, others or attempts
    if swap:
        attempts, others = others, attempts
    expert_msgs, expert_rewards = play(env, task, [query_turn(gold), SUBMIT])
    if expert_rewards[-1] < 1.0:
        return []  # keep only a working expert
    out = [{"id": f"{tid}/expert", "task": "intercode_sql", "messages": head + expert_msgs, "reward": 1.0}]
    wrong_msgs, wrong_rewards = play(env, task, [query_turn(attempts[-1]), SUBMIT])
    out.append({"id": f"{tid}/traj", "task_id": tid, "level": "trajectory", "prompt": head, "chosen": expert_msgs,
                "rejected": wrong_msgs, "chosen_reward": 1.0, "rejected_reward": wrong_rewards[-1]})
    # Branch after the expert's SHOW TABLES.
    chosen_msgs, chosen_rewards = play(env, task, [INSPECT, query_turn(gold), SUBMIT])
    rejected_msgs, rejected_rewards = play(env, task, [INSPECT, query_turn(others[0]), SUBMIT])
    out.append({"id": f"{tid}/step1", "task_id": tid, "level": "step", "prompt": head + chosen_msgs[:2],
                "chosen": chosen_msgs[2:], "rejected": rejected_msgs[2:], "chosen_reward": chosen_rewards[-1],
                "rejected_reward": rejected_rewards[-1]})
    groups = {1: [query_turn(gold)], 2: [query_turn(gold), SUBMIT], 3: [INSPECT, query_turn(gold), SUBMIT]}
    wrong = {1: attempts[0], 2: others[-1], 3: attempts[-1]}
    for length, chosen in groups.items():
        rejected = [INSPECT] * (length == 3) + [query_turn(wrong[length])] + [SUBMIT] * (length > 1)
        chosen_value, rejected_value = submit_value(env, task, chosen), submit_value(env, task, rejected)
        out.append({"id": f"{tid}/group{length}", "task_id": tid, "level": "group", "prompt": head,
                    "chosen": _strip_last_observation(play(env, task, chosen)[0]),
                    "rejected": _strip_last_observation(play(env, task, rejected)[0]),
                    "chosen_reward": chosen_value, "rejected_reward": rejected_value, "group_length": length,
                    "difficulty": round(chosen_value - rejected_value, 4)})
    return out


def main(n_train: int = 12, n_val: int = 8, seed: int = 0) -> None:
    episodes = json.loads(RECORDINGS.read_text())
    rng = random.Random(seed)
    with IntercodeSqlEnv() as env:
        train_tasks = env.tasks("train")
        failed = [t for t in train_tasks if episodes[str(t.meta["index"])]["summary"]["max_reward"] < 1.0
                  and len(episodes[str(t.meta["index"])]["turn_history"]["actions"]) >= 3]
        rng.shuffle(failed)
        splits: dict[str, list[dict]] = {"train": [], "val": []}
        for task in failed:
            split = "train" if len(splits["train"]) < n_train * 6 else "val"
            if split == "val" and len(splits["val"]) >= n_val * 6:
                break
            same_db = [t.meta["gold"] for t in train_tasks if t.meta["db"] == task.meta["db"] and t.id != task.id
                       and normalize_sql(t.meta["gold"]) != normalize_sql(task.meta["gold"])]
            others = rng.sample(same_db, min(len(same_db), 6))
            attempts = agent_queries(episodes[str(task.meta["index"])])
            splits[split].extend(build(env, task, attempts, others, swap=len(splits[split]) // 6 % 2 == 1))
    OUT.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        for r in records:
            parse_record(r)  # the data contract, before anything is written
        write_jsonl(OUT / f"{split}.jsonl", records)
        levels: dict[str, int] = {}
        for r in records:
            levels[r.get("level", "bc")] = levels.get(r.get("level", "bc"), 0) + 1
        print(f"{split}: {len(records)} records {levels}")


if __name__ == "__main__":
    main()
