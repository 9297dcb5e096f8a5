"""Importers from the formats agent data already comes in, to the data contract's trajectory records.

``python -m hpl_lightning.importers sharegpt|conversations|intercode --input IN --output OUT.jsonl``; every
written record is validated with the same schema ``train.py`` uses.
"""

from __future__ import annotations

from typing import Any

from hpl_lightning.errors import DataError
from hpl_lightning.schema import Trajectory, parse_trajectory, read_items, to_json, write_jsonl

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_messages(conversations: list[dict[str, Any]]) -> list[dict[str, str]]:
    """ETO/IPR's ``[{"from": "human"|"gpt", "value": ...}]`` as role/content messages."""
    messages = []
    for turn in conversations:
        role = SHAREGPT_ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"unknown speaker {turn.get('from')!r}")
        messages.append({"role": role, "content": turn.get("value", turn.get("content"))})
    return messages


def _trajectory(obj: dict[str, Any], messages: Any, task: str, where: tuple[str, int, int | str]) -> Trajectory:
    path, line, key = where
    record = {
        "id": str(obj.get("id", key)),
        "task": obj.get("task", task),
        "messages": messages,
        "reward": obj.get("reward", 1.0),
        "meta": {k: v for k, v in obj.items() if k not in ("id", "task", "reward", "conversations", "messages")},
    }
    return parse_trajectory(record, path, line)


def sharegpt(input: str, output: str, task: str = "agent") -> int:
    """ETO/IPR ShareGPT files (``conversations`` with ``from``/``value``); a missing ``reward`` means expert (1.0)."""
    records = []
    for line, key, obj in read_items(input):
        try:
            messages = sharegpt_messages(obj["conversations"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(input, line, "conversations", str(e)) from None
        records.append(_trajectory(obj, messages, task, (input, line, key)))
    return _write(records, output)


def conversations(input: str, output: str, task: str = "agent") -> int:
    """Role/content conversations under ``messages`` or ``conversations``."""
    records = []
    for line, key, obj in read_items(input):
        if not isinstance(obj, dict):
            raise DataError(input, line, None, "expected an object with 'messages' or 'conversations'")
        messages = obj.get("messages", obj.get("conversations"))
        records.append(_trajectory(obj, messages, task, (input, line, key)))
    return _write(records, output)


def intercode_episode(task_id: str, episode: dict[str, Any], instruction: str) -> Trajectory:
    """One InterCode recorded episode (``turn_history``) as a ReAct trajectory: instruction, "OK", question, turns."""
    history = episode["turn_history"]
    messages = [
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": episode["query"]},
    ]
    for thought, action, observation in zip(history["thoughts"], history["actions"], history["observations"]):
        messages.append({"role": "assistant", "content": f"Thought: {thought}\nAction: {action}"})
        messages.append({"role": "user", "content": f"Observation: {observation}"})
    if messages[-1]["role"] == "user" and history["actions"] and history["actions"][-1].strip() == "submit":
        messages.pop()  # nothing follows a submit
    reward = float(history["rewards"][-1]) if history["rewards"] else 0.0
    return Trajectory(
        id=f"intercode_sql/{task_id}",
        task="intercode_sql",
        messages=messages,
        reward=reward,
        meta={"hardness": episode.get("hardness"), "turn_rewards": history["rewards"], "source": "recorded"},
    )


def intercode(input: str, output: str, success_only: bool = True) -> int:
    """InterCode's recorded results (e.g. ``gpt-3.5_react_10_turns.json``); ``success_only`` keeps reward-1 episodes."""
    from hpl_lightning.envs.intercode_sql import INSTRUCTION

    records = []
    for line, key, episode in read_items(input):
        try:
            trajectory = intercode_episode(str(key), episode, INSTRUCTION)
        except KeyError as e:
            raise DataError(input, line, str(e.args[0]), f"missing in episode {key!r}") from None
        except (TypeError, ValueError, AttributeError, IndexError) as e:
            raise DataError(input, line, None, f"episode {key!r} is not an InterCode recording: {e}") from None
        if trajectory.n_actions and (not success_only or trajectory.reward >= 1.0):
            records.append(trajectory)
    return _write(records, output)


def _write(records: list[Trajectory], output: str) -> int:
    write_jsonl(output, (to_json(r) for r in records))
    print(f"wrote {len(records)} trajectories to {output}")
    return len(records)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI([sharegpt, conversations, intercode], as_positional=False)
