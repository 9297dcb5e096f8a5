"""Importers from the formats agent data already comes in, to the data contract's trajectory records.

``python -m hpl_lightning.importers sharegpt|conversations|intercode --input IN --output OUT.jsonl``; every
written record is validated with the same schema ``train.py`` uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from hpl_lightning.schema import DataError, Trajectory, decode_jsonl_line, parse_trajectory, to_json, write_jsonl

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _top_level_items(text: str) -> Iterator[tuple[int, int | str, Any]]:
    """(line, index or key, item) of a JSON array or object, parsed item by item so each knows its line."""
    decoder, i = json.JSONDecoder(), _skip_ws(text, 0)
    close = {"[": "]", "{": "}"}[text[i]]
    i, n = _skip_ws(text, i + 1), 0
    while text[i] != close:
        key: int | str = n + 1
        if close == "}":
            key, i = decoder.raw_decode(text, i)
            i = _skip_ws(text, i)
            if text[i] != ":":
                raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
            i = _skip_ws(text, i + 1)
        line = text.count("\n", 0, i) + 1
        item, i = decoder.raw_decode(text, i)
        yield line, key, item
        n, i = n + 1, _skip_ws(text, i)
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
        elif text[i] != close:
            raise json.JSONDecodeError(f"Expecting ',' or '{close}'", text, i)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _read_items(path: str | os.PathLike) -> Iterator[tuple[int, int | str, Any]]:
    """(line, index or key, item) from a JSON array, a JSON object keyed by id, or JSON Lines."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, data.count(b"\n", 0, e.start) + 1, None,
                        f"not UTF-8: byte 0x{data[e.start]:02x}") from None
    head = text.lstrip()
    if head[:1] == "[" or (head[:1] == "{" and not _is_json(head.split("\n", 1)[0])):  # else: JSON Lines
        try:
            yield from list(_top_level_items(text))
        except (json.JSONDecodeError, IndexError, RecursionError) as e:
            pos = getattr(e, "pos", len(text))
            raise DataError(path, text.count("\n", 0, pos) + 1, None, f"malformed JSON: {e}") from None
        return
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if raw.strip():
            yield lineno, lineno, decode_jsonl_line(raw, path, lineno)


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
    for line, key, obj in _read_items(input):
        try:
            messages = sharegpt_messages(obj["conversations"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(input, line, "conversations", str(e)) from None
        records.append(_trajectory(obj, messages, task, (input, line, key)))
    return _write(records, output)


def conversations(input: str, output: str, task: str = "agent") -> int:
    """Role/content conversations under ``messages`` or ``conversations``."""
    records = []
    for line, key, obj in _read_items(input):
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
    for line, key, episode in _read_items(input):
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
