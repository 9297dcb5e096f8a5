"""The data contract: trajectory and preference records in JSON Lines, validated on load.

Every error names the file, the line and the field, so bad data is caught before any GPU time is spent.
The format is documented in ``docs/data-format.md``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Union

from hpl_lightning.errors import DataError

Role = Literal["system", "user", "assistant"]
Level = Literal["trajectory", "step", "group"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
LEVELS: tuple[str, ...] = ("trajectory", "step", "group")


@dataclass(frozen=True)
class Trajectory:
    """One episode: ``messages`` alternate agent actions (assistant) and observations (user) after the task."""

    id: str
    task: str
    messages: list[dict[str, str]]
    reward: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_actions(self) -> int:
        return sum(m["role"] == "assistant" for m in self.messages)


@dataclass(frozen=True)
class PreferencePair:
    """A preferred vs dispreferred continuation of the same ``prompt`` at one level of the hierarchy."""

    id: str
    task_id: str
    level: str
    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    chosen_reward: float | None  # None: unknown (imported data that records none); never made up
    rejected_reward: float | None
    group_length: int | None = None
    difficulty: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


Record = Union[Trajectory, PreferencePair]
ACKNOWLEDGEMENT_MAX_CHARS = 20


def task_statement_index(messages: list[dict[str, str]]) -> int | None:
    """Index of the message that states the task (None without a user message): the one place that decides where
    the task statement ends, for tokenization (never scored nor truncated), segmentation and pair building.

    Leading system messages are skipped and the first user message states the task, unless it is followed by an
    acknowledgement and another user message, ETO/IPR's ``[user: instruction, assistant: "OK", user: task]``: then
    the task is that third message. An acknowledgement is a short assistant turn (at most 20 characters) with no
    ``Action:``, e.g. ``OK``, ``Okay.``, ``Sure, let's start.``; it is never an agent action.
    """
    i = 0
    while i < len(messages) and messages[i]["role"] == "system":
        i += 1
    if i == len(messages) or messages[i]["role"] != "user":
        return next((j for j in range(i, len(messages)) if messages[j]["role"] == "user"), None)
    ack = messages[i + 1] if i + 1 < len(messages) else None
    if (
        ack is not None
        and ack["role"] == "assistant"
        and i + 2 < len(messages)
        and messages[i + 2]["role"] == "user"
        and len(ack["content"].strip()) <= ACKNOWLEDGEMENT_MAX_CHARS
        and "Action:" not in ack["content"]
    ):
        return i + 2
    return i


def head_length(messages: list[dict[str, str]]) -> int:
    """Messages up to and including the task statement (:func:`task_statement_index`); the agent's actions are the
    assistant messages after them."""
    index = task_statement_index(messages)
    if index is None:
        return next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    return index + 1


class _Checker:
    """Field checks bound to one record's location."""

    def __init__(self, obj: Any, path: str | os.PathLike | None, line: int | None):
        self.obj, self.path, self.line = obj, path, line

    def fail(self, name: str | None, problem: str) -> DataError:
        return DataError(self.path, self.line, name, problem)

    def require(self, name: str) -> Any:
        if name not in self.obj:
            raise self.fail(name, "missing")
        return self.obj[name]

    def string(self, name: str) -> str:
        value = self.require(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # numeric ids are common in exported data
        if not isinstance(value, str) or not value:
            raise self.fail(name, f"expected a non-empty string, got {value!r:.60}")
        return value

    def number(self, name: str, optional: bool = False, nullable: bool = False) -> float | None:
        """A finite number; ``optional``: absent or null is None; ``nullable``: must be there, null is None."""
        if optional and self.obj.get(name) is None:
            return None
        value = self.require(name)
        if nullable and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(name, f"expected a finite number, got {value!r:.60}")
        return float(value)

    def messages(self, name: str, allow_empty: bool = False) -> list[dict[str, str]]:
        value = self.require(name)
        if not isinstance(value, list):
            raise self.fail(name, f"expected a list of messages, got {type(value).__name__}")
        if not value and not allow_empty:
            raise self.fail(name, "empty message list")
        out = []
        for i, msg in enumerate(value):
            where = f"{name}[{i}]"
            if not isinstance(msg, dict):
                raise self.fail(where, "expected an object with 'role' and 'content'")
            role, content = msg.get("role"), msg.get("content")
            if role not in ROLES:
                raise self.fail(f"{where}.role", f"expected one of {ROLES}, got {role!r}")
            if not isinstance(content, str):
                raise self.fail(f"{where}.content", f"expected a string, got {type(content).__name__}")
            out.append({"role": role, "content": content})
        return out

    def meta(self) -> dict[str, Any]:
        value = self.obj.get("meta") or {}
        if not isinstance(value, dict):
            raise self.fail("meta", "expected an object")
        return value


def parse_trajectory(obj: Any, path: str | os.PathLike | None = None, line: int | None = None) -> Trajectory:
    c = _Checker(obj, path, line)
    if not isinstance(obj, dict):
        raise c.fail(None, "expected a JSON object")
    messages = c.messages("messages")
    if not any(m["role"] == "assistant" for m in messages[head_length(messages):]):
        raise c.fail(
            "messages", "no agent action after the task statement (an acknowledgement such as 'OK' before the task "
            "message is not an action): a trajectory needs at least one assistant turn after it"
        )
    return Trajectory(c.string("id"), c.string("task"), messages, c.number("reward"), c.meta())


def parse_pair(obj: Any, path: str | os.PathLike | None = None, line: int | None = None) -> PreferencePair:
    c = _Checker(obj, path, line)
    if not isinstance(obj, dict):
        raise c.fail(None, "expected a JSON object")
    level = c.require("level")
    if level not in LEVELS:
        raise c.fail("level", f"unknown level {level!r}; expected one of {LEVELS}")
    prompt = c.messages("prompt")
    chosen, rejected = c.messages("chosen"), c.messages("rejected")
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in msgs):
            raise c.fail(name, "no assistant turn: nothing to score")
    group_length = difficulty = None
    if level == "group":
        gl = c.require("group_length")
        if isinstance(gl, bool) or not isinstance(gl, int) or gl < 1:
            raise c.fail("group_length", f"expected a positive integer, got {gl!r}")
        n_actions = sum(m["role"] == "assistant" for m in chosen)
        whole = c.meta().get("chosen_whole") is True  # imported with the expert's whole suffix as chosen
        if gl != n_actions and not (whole and gl < n_actions):
            raise c.fail("group_length", f"is {gl} but 'chosen' has {n_actions} assistant turns")
        group_length, difficulty = gl, c.number("difficulty")
    chosen_reward = c.number("chosen_reward", nullable=True)
    rejected_reward = c.number("rejected_reward", nullable=True)
    return PreferencePair(
        id=c.string("id"),
        task_id=c.string("task_id"),
        level=level,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        chosen_reward=chosen_reward,
        rejected_reward=rejected_reward,
        group_length=group_length,
        difficulty=difficulty,
        meta=c.meta(),
    )


def parse_record(obj: Any, path: str | os.PathLike | None = None, line: int | None = None) -> Record:
    """A preference record has ``chosen``; a trajectory record has ``messages``."""
    if isinstance(obj, dict) and "chosen" in obj:
        return parse_pair(obj, path, line)
    if isinstance(obj, dict) and "messages" in obj:
        return parse_trajectory(obj, path, line)
    raise DataError(path, line, None, "neither a preference record (needs 'chosen') nor a trajectory ('messages')")


MAX_RECORD_BYTES = 1 << 20  # one JSONL line; a larger record is an error (docs/data-format.md), never tokenized
MAX_NESTING = 64  # JSON depth of one record (messages sit at depth 3)


def _check_values(obj: Any, path: str | os.PathLike | None, line: int | None) -> None:
    """Depth and strings of a decoded record, iteratively (a deep record must not overflow this check either):
    deeper than ``MAX_NESTING`` or a lone surrogate (``\\ud800`` escapes decode, but no text encoder takes them)."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_NESTING:
            raise DataError(path, line, where.lstrip(".") or None, f"nested deeper than {MAX_NESTING} levels")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = value[e.start]
                raise DataError(path, line, where.lstrip(".") or None,
                                f"lone surrogate \\u{ord(bad):04x} at character {e.start}: not valid Unicode") from None
        elif isinstance(value, dict):
            for k, v in value.items():
                stack.append((k, where, depth + 1))
                stack.append((v, f"{where}.{k}", depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))


def decode_jsonl_line(raw: bytes, path: str | os.PathLike | None, line: int) -> Any:
    """One JSONL line (bytes, newline included or not) to its object; anything but a well-formed UTF-8 JSON value
    within the limits raises DataError naming the line: UTF-16, other encodings, lone surrogates, nesting, size."""
    if len(raw.rstrip(b"\r\n")) > MAX_RECORD_BYTES:
        raise DataError(path, line, None, f"record longer than {MAX_RECORD_BYTES:,} bytes (the limit of one line)")
    if line == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(path, line, None, "UTF-16 text (byte order mark): JSON Lines must be UTF-8 "
                                          "(convert with: iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in raw:
        raise DataError(path, line, None, f"NUL byte at column {raw.index(0) + 1}: UTF-16 or binary data? "
                                          "JSON Lines must be UTF-8")
    try:
        text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line, None, f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, line, None, f"malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(path, line, None, f"nested deeper than {MAX_NESTING} levels") from None
    _check_values(obj, path, line)
    return obj


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yields (line number, decoded object), skipping blank lines; a bad line raises DataError (see
    :func:`decode_jsonl_line`). Reads at most ``MAX_RECORD_BYTES`` + 2 bytes of a line: memory stays bounded."""
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(MAX_RECORD_BYTES + 2):  # + "\r\n"
            lineno += 1
            if raw.strip():
                yield lineno, decode_jsonl_line(raw, path, lineno)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Every object of a JSON Lines file, read and checked as :func:`iter_jsonl` does (bounded lines, one-line
    errors naming the file and line)."""
    return [obj for _, obj in iter_jsonl(path)]


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


def read_items(path: str | os.PathLike) -> Iterator[tuple[int, int | str, Any]]:
    """(line, index or key, item) from a JSON array, a JSON object keyed by id, or JSON Lines."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, data.count(b"\n", 0, e.start) + 1, None,
                        f"not UTF-8: byte 0x{data[e.start]:02x}") from None
    head = text.lstrip()
    # one JSON document (an array, or an object keyed by id), else JSON Lines (objects, one a line)
    if head[:1] == "[" or (head[:1] == "{" and (_is_json(text) or not _is_json(head.split("\n", 1)[0]))):
        try:
            yield from list(_top_level_items(text))
        except (json.JSONDecodeError, IndexError, RecursionError) as e:
            pos = getattr(e, "pos", len(text))
            raise DataError(path, text.count("\n", 0, pos) + 1, None, f"malformed JSON: {e}") from None
        return
    for lineno, raw in enumerate(data.splitlines(), start=1):
        if raw.strip():
            yield lineno, lineno, decode_jsonl_line(raw, path, lineno)


def load_records(path: str | os.PathLike) -> list[tuple[Record, int]]:
    """All records of a file with their line numbers; ids must be unique within the file."""
    if not Path(path).is_file():
        raise DataError(path, None, None, "file not found")
    records: list[tuple[Record, int]] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        record = parse_record(obj, path, lineno)
        if record.id in seen:
            raise DataError(path, lineno, "id", f"duplicate id {record.id!r} (first on line {seen[record.id]})")
        seen[record.id] = lineno
        records.append((record, lineno))
    if not records:
        raise DataError(path, None, None, "no records")
    return records


def to_json(record: Record) -> dict[str, Any]:
    out = asdict(record)
    if isinstance(record, PreferencePair) and record.level != "group":
        out.pop("group_length")
        out.pop("difficulty")
    return out


def append_jsonl(path: str | os.PathLike, objs: Iterable[dict[str, Any]]) -> None:
    """Appends and flushes line by line, so a crash loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            f.flush()


def write_jsonl(path: str | os.PathLike, objs: Iterable[dict[str, Any]]) -> None:
    """Writes atomically (temp file then rename): an interrupted write never leaves a half file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
