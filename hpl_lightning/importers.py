"""Importers from the formats agent data already comes in, to the data contract's records: trajectories (ETO/IPR
ShareGPT, role/content conversations, InterCode's recordings) and the preference pairs of the authors' release.

``python -m hpl_lightning.importers sharegpt|conversations|intercode --input IN --output OUT.jsonl``
(``hpl-pipeline import --source hpl_release ...`` for the release's pairs); every written record is validated with
the same schema ``train.py`` uses.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from hpl_lightning.curriculum import Curriculum
from hpl_lightning.errors import DataError
from hpl_lightning.schema import (
    PreferencePair,
    Trajectory,
    head_length,
    parse_pair,
    parse_trajectory,
    read_items,
    to_json,
    write_jsonl,
)

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



# ------------------------------------------------------------------------------------------------ the HPL release
# What the authors' release (github.com/PatrickG1014/HPL, commit dc23ada) writes: JSON lists of pairs with ShareGPT
# turns, from pipeline/trajectory/create_preference_traj.py ({"id": f"{task}_0", ...}), pipeline/step/
# construct_preference_step.py ({"id": f"{task}_{iteration}", ...}), pipeline/group/construct_preference_group.py
# ({"id": group_id, ..., "group_length", "difficulty"}) and pipeline/group/create_curriculum.py (phase_K_data.json:
# lists of group pairs, cumulative). None records a reward of either side.
RELEASE_PHASE_FILE = re.compile(r"phase_(\d+)_data\.json$")
# create_curriculum.py's buckets, one setting for every benchmark: lengths <= 3 / 4-6 / > 6, gaps >= 0.7 / 0.4
RELEASE_CURRICULUM = Curriculum(length_thresholds=(3, 6), difficulty_thresholds=(0.7, 0.4))
GroupChosen = Literal["group", "whole"]
Where = tuple[str, int]


def _release_turns(obj: dict[str, Any], name: str, where: Where) -> list[dict[str, str]]:
    turns = obj.get(name)
    if not isinstance(turns, list):
        raise DataError(*where, name, "missing or not a list of ShareGPT turns {'from': 'human'|'gpt', 'value'}")
    for i, turn in enumerate(turns):
        if not (isinstance(turn, dict) and turn.get("from") in ("human", "gpt") and isinstance(turn.get("value"), str)):
            raise DataError(*where, f"{name}[{i}]", f"expected {{'from': 'human'|'gpt', 'value': string}}, got "
                                                    f"{turn!r:.60}")
    return sharegpt_messages(turns)


def _first_actions(messages: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """The turns up to and including the n-th assistant turn (all of them when there are fewer)."""
    ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return messages[: ends[n - 1] + 1] if len(ends) >= n else messages


def release_pair(obj: Any, where: Where, benchmark: str, level: str | None = None,
                 group_chosen: GroupChosen = "group") -> PreferencePair:
    """One pair of the release as a validated preference record.

    The level is the file's kind unless ``level`` says: group pairs carry ``group_length``; a trajectory pair's
    prompt ends at the task statement, a step pair's holds expert actions. The task id is ``<benchmark>/<their
    id>``, a trajectory or step id without its ``_<iteration>`` suffix. Rewards are null: the release records none
    (a group pair's ``difficulty``, the value gap, is theirs). A group pair's chosen side is cut after its
    ``group_length``-th action (the paper's G_w: the group's own actions), or with ``group_chosen: whole`` kept as
    written (``meta.chosen_whole``).
    """
    if not isinstance(obj, dict):
        raise DataError(*where, None, "expected a pair object {id, prompt, chosen, rejected, ...}")
    if "id" not in obj:
        raise DataError(*where, "id", "missing")
    prompt, chosen, rejected = (_release_turns(obj, name, where) for name in ("prompt", "chosen", "rejected"))
    found = "group" if "group_length" in obj else "step" if head_length(prompt) < len(prompt) else "trajectory"
    level = level or found
    if level == "group" and "group_length" not in obj:
        raise DataError(*where, "group_length", "missing: not a group pair (construct_preference_group.py's output)")
    their_id = str(obj["id"])
    meta: dict[str, Any] = {"source": "hpl_release", "release_id": their_id}
    stem, _, iteration = their_id.rpartition("_")
    if level == "group" or not (stem and iteration.isdigit()):
        stem = their_id
    else:
        meta["iteration"] = int(iteration)
    record: dict[str, Any] = {"id": f"{benchmark}/{their_id}|{level}", "task_id": f"{benchmark}/{stem}",
                              "level": level, "prompt": prompt, "chosen": chosen, "rejected": rejected,
                              "chosen_reward": None, "rejected_reward": None, "meta": meta}
    if level == "group":
        length = obj["group_length"]
        record.update(group_length=length, difficulty=obj.get("difficulty"))
        if group_chosen == "whole":
            meta["chosen_whole"] = True
        elif isinstance(length, int) and not isinstance(length, bool) and length > 0:
            record["chosen"] = _first_actions(chosen, length)
    return parse_pair(record, *where)


def hpl_release(inputs: str | list[str], output: str, benchmark: str, level: str | None = None,
                group_chosen: GroupChosen = "group", limit: int | None = None) -> int:
    """The release's trajectory, step and group pair files and its curriculum phase files (``phase_K_data.json``)
    as one preference JSONL (:func:`release_pair`). A pair listed in several phase files is written once, with
    ``meta.release_phase`` the first phase listing it; the phases must be cumulative and follow create_curriculum.py's
    buckets, so that ``data.curriculum.length_thresholds=[3, 6]`` trains them as released."""
    pairs: dict[str, tuple[PreferencePair, Where]] = {}
    phases: dict[str, list[int]] = {}
    for path in [inputs] if isinstance(inputs, str) else inputs:
        phase = RELEASE_PHASE_FILE.search(Path(path).name)
        for line, _, obj in read_items(path):
            pair = release_pair(obj, (path, line), benchmark, level, group_chosen)
            if phase and pair.level != "group":
                raise DataError(path, line, None, "a curriculum phase file holds group pairs only")
            if pair.id in pairs and not (phase and pair == pairs[pair.id][0]):
                first = pairs[pair.id][1]
                raise DataError(path, line, "id", f"{pair.meta['release_id']!r} is already at {first[0]}:{first[1]}"
                                + (" with other content" if phase else ""))
            pairs.setdefault(pair.id, (pair, (path, line)))
            if phase:
                phases.setdefault(pair.id, []).append(int(phase.group(1)))
    given = sorted({k for ks in phases.values() for k in ks})
    records = []
    for pair, where in pairs.values():
        if pair.id in phases:
            first = min(phases[pair.id])
            if sorted(phases[pair.id]) != [k for k in given if k >= first]:
                raise DataError(*where, None, f"listed in phase file(s) {sorted(phases[pair.id])} of {given}: the "
                                              "release's phases are cumulative")
            bucketed = RELEASE_CURRICULUM.first_phase("group", pair.group_length, pair.difficulty)
            if bucketed != first:
                raise DataError(*where, "difficulty", f"first in phase {first}, but create_curriculum.py's buckets "
                                f"put {RELEASE_CURRICULUM.bucket(pair.group_length, pair.difficulty)} in phase "
                                f"{bucketed}")
            pair = replace(pair, meta={**pair.meta, "release_phase": first})
        records.append(to_json(pair))
    records = records[:limit]
    write_jsonl(output, records)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(Counter(r["level"] for r in records).items()))
    print(f"wrote {len(records)} pairs ({kinds}) to {output}; rewards unknown (null): the release records none"
          + ("; its phases: train with data.curriculum.length_thresholds=[3, 6]" if phases else ""))
    return len(records)
