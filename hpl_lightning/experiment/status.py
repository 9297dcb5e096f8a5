"""What is done, what is left and what it costs: the plan as printed before a run (and by ``--dry_run``).

Evaluations published in ``results_dir`` count as done here too (a dry run restores nothing), and the stages only
they needed count as not needed, so a fresh checkout of a finished study prices only what is left.
"""

from __future__ import annotations

from typing import Sequence

from hpl_lightning.experiment.kinds import StageKind, by_name
from hpl_lightning.experiment.plan import Plan, needed
from hpl_lightning.experiment.publishing import published_record
from hpl_lightning.experiment.settings import Experiment


def status(exp: Experiment, plan: Plan, kinds: Sequence[StageKind]) -> tuple[set[str], set[str]]:
    """Keys of the finished stages (published stages of restorable kinds count) and of those still to run
    (unfinished and needed by an unfinished evaluation)."""
    table = by_name(kinds)
    done = {s.key for s in plan.stages
            if s.done or (table[s.kind].restorable and published_record(exp, s) is not None)}
    return done, needed(plan, done)


def describe_plan(exp: Experiment, plan: Plan, kinds: Sequence[StageKind]) -> str:
    done, to_run = status(exp, plan, kinds)
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
        lines.append(f"  {kind.name:<14} {len(stages):>3} stage(s), {n_done} done, "
                     + (f"{skipped} not needed, " if skipped else "") + f"{n_run} to run  {cost}")
    lines.append(f"rough cost: ~{total['to run'] / 3600:.1f} h to go, ~{total['all'] / 3600:.1f} h for the whole plan"
                 if known else "rough cost: unknown (set cost: in the config)")
    return "\n".join(lines)
