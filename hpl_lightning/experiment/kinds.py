"""The registry of stage kinds: one entry per kind, in running order, saying how it runs, what it costs, how it
shards and what it publishes. The plan, the executor and the printed plan read this table and nothing else about
a kind; adding a kind is one new module with its body plus one entry here (``docs/experiment-runner.md``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

from hpl_lightning.evaluation import EPISODES_FILE
from hpl_lightning.experiment import stages
from hpl_lightning.experiment.plan import Plan, Stage
from hpl_lightning.experiment.settings import Experiment
from hpl_lightning.experiment.shards import Shard


class StageBody(Protocol):
    def __call__(self, exp: Experiment, plan: Plan, st: Stage, shard: Shard | None) -> dict[str, Any]:
        """Does the stage's work in ``st.dir`` (or its shard's directory); returns its record's result."""


# (units of work, seconds per unit from the config's ``cost``; None: unknown) of one stage, for the printed plan
CostModel = Callable[[Experiment, Plan, Stage], "tuple[float, float | None]"]


@dataclass(frozen=True)
class StageKind:
    """One kind of stage. ``shard_group``: the ``--stage`` value that shards it (``explore`` covers both exploration
    kinds); ``publishes``: files copied to results_dir beside the record; ``restorable``: a published stage of the
    kind is taken as done on a fresh checkout; ``expand``: for a kind outside the built-in DAG, adds its stages to a
    built plan (each depending on stages already there); ``cost``: None when it generates no text (minutes)."""

    name: str
    run: StageBody
    cost: CostModel | None = None
    shard_group: str | None = None
    publishes: tuple[str, ...] = ()
    restorable: bool = False
    expand: Callable[[Experiment, Plan], Iterable[Stage]] | None = None


def _per_task(rate: Callable[[Experiment], float | None]) -> CostModel:
    return lambda exp, plan, st: (plan.train_tasks or 0, rate(exp))


def _per_run(rate: Callable[[Experiment], float | None]) -> CostModel:
    return lambda exp, plan, st: (1, rate(exp))


def _per_episode(exp: Experiment, plan: Plan, st: Stage) -> tuple[float, float | None]:
    return plan.eval_tasks[st.params["split"]] or 0, exp.cost.eval_episode


KINDS: tuple[StageKind, ...] = (
    StageKind("experts", stages.experts),
    StageKind("sft", stages.sft, cost=_per_run(lambda exp: exp.cost.sft_run)),
    # segmentation before exploration, so one sharded pass (--stage explore) covers both exploration kinds
    StageKind("segment", stages.segment),
    StageKind("explore", stages.explore, cost=_per_task(lambda exp: exp.cost.explore_task), shard_group="explore"),
    StageKind("explore_group", stages.explore, cost=_per_task(lambda exp: exp.cost.explore_group_task),
              shard_group="explore"),
    StageKind("pairs", stages.pairs),
    StageKind("train", stages.train, cost=_per_run(lambda exp: exp.cost.train_run)),
    StageKind("evaluate", stages.evaluate, cost=_per_episode, shard_group="evaluate", publishes=(EPISODES_FILE,),
              restorable=True),
)


def by_name(kinds: Iterable[StageKind]) -> dict[str, StageKind]:
    return {k.name: k for k in kinds}


def matches(kind: StageKind, wanted: str | None) -> bool:
    """Whether ``--stage``/``--stop_before`` ``wanted`` names this kind (``explore`` names both exploration kinds)."""
    return wanted is not None and wanted in (kind.name, kind.shard_group)
