"""Sharding one stage over many processes (``--shard K/N --stage KIND``, e.g. one SLURM array task each) and
merging the finished shards back into the stage's one output file, checking that every task is in exactly one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hpl_lightning.errors import UsageError
from hpl_lightning.experiment.plan import Stage
from hpl_lightning.experiment.records import DONE_FILE, read_record
from hpl_lightning.schema import read_jsonl, write_jsonl


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``: task i of the sorted task ids belongs to shard i mod count."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            k, n = (int(x) for x in text.split("/"))
        except ValueError:
            raise UsageError(f"--shard {text!r}: expected K/N, e.g. 0/8") from None
        if not 0 <= k < n:
            raise UsageError(f"--shard {text!r}: K must be in 0..N-1")
        return cls(k, n)

    def select(self, ids: Sequence[str]) -> list[str]:
        return [t for i, t in enumerate(sorted(ids)) if i % self.count == self.index]

    @property
    def label(self) -> str:
        return f"{self.index}-of-{self.count}"


def shard_dir(st: Stage, shard: Shard) -> Path:
    return st.dir / "shards" / shard.label


def merge_shards(parts: dict[int, tuple[list[str], list[dict[str, Any]]]], count: int, all_ids: Sequence[str],
                 task_field: str) -> list[dict[str, Any]]:
    """Concatenates the records of shards 0..count-1, checking every task is in exactly one finished shard and
    every record belongs to its shard's tasks."""
    missing = sorted(set(range(count)) - set(parts))
    if missing:
        raise UsageError(f"shards {missing} of {count} are not finished; run them (--shard K/{count}) first")
    owner: dict[str, int] = {}
    for k, (ids, _) in parts.items():
        for t in ids:
            if t in owner:
                raise UsageError(f"task {t} is in shards {owner[t]} and {k}")
            owner[t] = k
    absent = sorted(set(all_ids) - set(owner))
    if absent:
        raise UsageError(f"{len(absent)} task(s) in no shard, e.g. {absent[:3]}")
    records = []
    for k in sorted(parts):
        for r in parts[k][1]:
            if owner.get(r[task_field]) != k:
                raise UsageError(f"shard {k} holds a record of task {r[task_field]}, which is not its task")
            records.append(r)
    return records


def merge_stage(st: Stage, all_ids: list[str], filename: str, task_field: str) -> dict[str, Any]:
    """Merges the finished shards of ``st`` into ``st.dir / filename``; the result of the stage's record."""
    parts = {}
    count = None
    for d in sorted((st.dir / "shards").iterdir()):
        record = read_record(d / DONE_FILE)
        if record is None:
            continue
        k, n = (int(x) for x in d.name.split("-of-"))
        if count not in (None, n):
            raise UsageError(f"{st.dir / 'shards'} mixes shard counts {count} and {n}")
        count = n
        path = d / filename
        parts[k] = (record["result"]["tasks"], read_jsonl(path) if path.exists() else [])
    if count is None:
        raise UsageError(f"{st.dir / 'shards'}: no finished shard; run the shards first")
    records = merge_shards(parts, count, all_ids, task_field)
    write_jsonl(st.dir / filename, records)
    print(f"merged {count} shards: {len(records)} records of {len(all_ids)} tasks -> {st.dir / filename}")
    return {"tasks": all_ids, "merged_shards": count, "records": len(records)}
