"""What is done, stale or left, and what it costs: the plan as printed before a run (and by ``--dry_run``).

Evaluations published in ``results_dir`` count as done here too (a dry run restores nothing), and the stages only
they needed count as not needed, so a fresh checkout of a finished study prices only what is left. A stage whose
record was made by other code than this checkout's (``provenance``), or that was built on such a stage, is stale:
it counts as not done, and is named, unless ``--reuse_stale`` takes it as it is.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from hpl_lightning.experiment.kinds import StageKind, by_name
from hpl_lightning.experiment.plan import Plan, Stage, needed
from hpl_lightning.experiment.provenance import Provenance, changes
from hpl_lightning.experiment.publishing import published_record
from hpl_lightning.experiment.records import DONE_FILE, read_record
from hpl_lightning.experiment.settings import Experiment


@dataclass
class Status:
    """Where a plan stands. ``done``: keys of stages that count as finished (fresh ones, and stale ones taken with
    ``--reuse_stale``); ``to_run``: unfinished stages an unfinished evaluation needs; ``stale``: key -> why, for every
    stage whose record (here or published) comes from other code, or that was built on a stale stage."""

    done: set[str]
    to_run: set[str]
    stale: dict[str, str] = field(default_factory=dict)


def current_provenance(exp: Experiment, st: Stage, kind: StageKind, prov: Provenance) -> dict:
    """The provenance a stage of ``kind`` would record if it ran now."""
    return prov.fingerprint(kind.code, kind.inputs(exp, st, prov) if kind.inputs else {})


def status(exp: Experiment, plan: Plan, kinds: Sequence[StageKind], prov: Provenance,
           reuse_stale: bool = False) -> Status:
    """Finished, stale and still-to-run stages. A stage's own record counts, or the published one (restorable
    kinds: as done; any kind: for judging staleness downstream)."""
    table = by_name(kinds)
    done: set[str] = set()
    stale: dict[str, str] = {}
    for st in plan.stages:  # dependencies come first
        kind = table[st.kind]
        record = read_record(st.dir / DONE_FILE) or published_record(exp, st)
        if record is None:
            continue
        current = current_provenance(exp, st, kind, prov)
        recorded = record.get("provenance") or {}
        if recorded.get("fingerprint") != current["fingerprint"]:
            stale[st.key] = changes(recorded, current)
        else:
            built_on = [d for d in st.deps if d.key in stale]
            if built_on:
                stale[st.key] = f"built on stale {built_on[0].kind} {built_on[0].label}"
        finished = st.done or (kind.restorable and published_record(exp, st) is not None)
        if finished and (st.key not in stale or reuse_stale):
            done.add(st.key)
    return Status(done, needed(plan, done), stale)


def describe_plan(exp: Experiment, plan: Plan, kinds: Sequence[StageKind], state: Status,
                  reuse_stale: bool = False) -> str:
    done, to_run = state.done, state.to_run
    lines = [f"experiment {exp.root}: {len(exp.arm_names)} arms x {len(exp.seeds)} seeds on {exp.benchmark.name} "
             f"({plan.train_tasks if plan.train_tasks is not None else '?'} training tasks; evaluation "
             + ", ".join(f"{s}: {n if n is not None else 'all'} tasks" for s, n in plan.eval_tasks.items()) + ")",
             f"arms: {', '.join(exp.arm_names)}; seeds: {exp.seeds}; "
             f"SFT models: {sum(s.kind == 'sft' for s in plan.stages)}"]
    total = {"all": 0.0, "to run": 0.0}
    known = True
    for kind in kinds:
        stages = [s for s in plan.stages if s.kind == kind.name]
        if not stages:
            continue
        costs = {"all": 0.0, "to run": 0.0}
        priced = kind.cost is not None
        for st in stages:
            if kind.cost is None:
                continue
            units, rate = kind.cost(exp, plan, st)
            if rate is None:
                priced = False
                known = known and units == 0
                continue
            costs["all"] += units * rate
            if st.key in to_run:
                costs["to run"] += units * rate
        for k in total:
            total[k] += costs[k]
        n_done, n_run = sum(s.key in done for s in stages), sum(s.key in to_run for s in stages)
        skipped = len(stages) - n_done - n_run
        cost = ("minutes at most" if kind.cost is None else f"~{costs['to run'] / 3600:.2f} h to go" if priced
                else "cost ?")
        n_stale = sum(s.key in state.stale for s in stages)
        lines.append(f"  {kind.name:<14} {len(stages):>3} stage(s), {n_done} done, "
                     + (f"{n_stale} stale{' (reused)' if reuse_stale else ''}, " if n_stale else "")
                     + (f"{skipped} not needed, " if skipped else "") + f"{n_run} to run  {cost}")
    lines.append(f"rough cost: ~{total['to run'] / 3600:.1f} h to go, ~{total['all'] / 3600:.1f} h for the whole plan"
                 if known else "rough cost: unknown (set cost: in the config)")
    if state.stale:
        lines.append("stale (made by other code than this checkout's; "
                     + ("taken as done: --reuse_stale" if reuse_stale else "planned again; --reuse_stale takes them")
                     + "):")
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for s in plan.stages:
            if s.key in state.stale:
                groups[(s.kind, state.stale[s.key])].append(s.label)
        for (kind_name, why), labels in groups.items():
            shown = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
            lines.append(f"  {kind_name} ({len(labels)}): {why}: {shown}")
    return "\n".join(lines)
