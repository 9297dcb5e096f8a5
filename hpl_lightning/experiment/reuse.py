"""Rollouts a widened exploration takes from a finished one instead of generating them again.

A rollout depends on its plan (task, level, index), the policy, the settings that shape a completion and the code,
not on which other plans run beside it: sampling seeds are per request (``policies.request_seed``). So when an
exploration stage differs from a finished sibling only in which plans it selects (``step_stride``,
``max_steps_per_task``, ``max_groups_per_task``) and selects every plan the sibling did, the sibling's rollouts are
the ones this stage would generate for those plans (up to floating-point effects of which requests share a batch,
as for a resumed stage): it starts from them and generates the new plans' only (``pipeline.explore`` skips the keys
already in its file). Sharded runs do not reuse (``docs/experiment-runner.md``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hpl_lightning.experiment.plan import Stage
from hpl_lightning.experiment.records import DONE_FILE, read_record

ROLLOUTS = "rollouts.jsonl"
SELECTION = ("step_stride", "max_steps_per_task", "max_groups_per_task")


def selects_all_of(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether exploration config ``new`` selects every plan ``old`` selects: step plans sit at the first
    ``max_steps_per_task`` multiples of ``step_stride`` (None: no cap), group plans at the first
    ``max_groups_per_task`` groups."""
    new_cap, old_cap = new["max_steps_per_task"], old["max_steps_per_task"]
    if old["step_stride"] % new["step_stride"]:
        return False
    if new_cap is not None and (old_cap is None or (old_cap - 1) * old["step_stride"] // new["step_stride"] >= new_cap):
        return False
    new_groups, old_groups = new["max_groups_per_task"], old["max_groups_per_task"]
    return new_groups is None or (old_groups is not None and old_groups <= new_groups)


def _rest(params: dict[str, Any]) -> dict[str, Any]:
    """The settings but plan selection, as JSON reads them back (tuples as lists)."""
    out = json.loads(json.dumps(params))
    out["config"] = {k: v for k, v in out["config"].items() if k not in SELECTION}
    return out


def reuse_rollouts(root: Path, st: Stage, provenance: dict[str, Any]) -> dict[str, Any] | None:
    """For exploration stage ``st`` about to start with no rollouts: copies in the rollouts of a finished sibling
    (same kind, dependencies and code fingerprint, the same settings but a plan selection that ``st``'s covers).
    Returns what it took (for the stage's record), or None."""
    target = st.dir / ROLLOUTS
    if target.exists() or (st.dir / "shards").exists():
        return None
    for done in sorted(st.dir.parent.glob(f"*/{DONE_FILE}")):
        record = read_record(done)
        if (record is None or record.get("kind") != st.kind or record.get("key") == st.key
                or record.get("deps") != [d.key for d in st.deps]
                or (record.get("provenance") or {}).get("fingerprint") != provenance["fingerprint"]
                or not isinstance(record.get("params"), dict)
                or _rest(record["params"]) != _rest(st.params)
                or not selects_all_of(st.params["config"], record["params"]["config"])):
            continue
        source = done.parent / ROLLOUTS
        st.dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{ROLLOUTS}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)  # all or nothing: a kill mid-copy leaves no rollouts file, and the copy runs again
        with target.open("rb") as f:
            n = sum(1 for _ in f)
        taken = {"from": str(done.parent.relative_to(root)), "rollouts": n}
        print(f"{st.kind} {st.label}: starts from the {n} rollouts of {taken['from']} (the same plans, settings and "
              f"code; it explores the plans that one did not select)", flush=True)
        return taken
    return None
