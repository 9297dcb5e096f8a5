"""The plan: every stage an experiment needs, its dependencies and its key. Pure: builds objects, writes nothing.

A stage lives in ``<output_dir>/<kind>/<label>-<key>/``; its key hashes its kind, its parameters and its
dependencies' keys, so changing a setting changes the keys of the stages it feeds, and only those run again. These
keys name the published result folders (``results/*/stages/``): ``tests/data/stage_keys.json`` pins the key of every
stage of every shipped experiment config, so a change that moves them is a deliberate one.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from hpl_lightning.errors import UsageError
from hpl_lightning.experiment.records import DONE_FILE, read_record
from hpl_lightning.experiment.settings import PREFERENCE_LEVELS, SFT_DEFAULTS, STATISTICS_ONLY, Experiment, flatten


# Parameters added to a stage kind after stages of it were published, with the value that reproduces what ran before
# they existed: at that value they stay out of the key, so the published stages are still found (whether they are
# current is their code fingerprint's business, not their key's); any other value moves the key.
ADDED_LATER: dict[str, dict[str, Any]] = {"pairs.filters": {"step_both_directions": False},
                                          "exploration": {"engine": "recompute", "max_context": None},
                                          "exploration.config": {"trajectory_to_end": False},
                                          "evaluation": {"engine": "recompute", "max_context": None}}


def without_added_later(params: dict[str, Any], where: str) -> dict[str, Any]:
    legacy = ADDED_LATER.get(where, {})
    return {k: v for k, v in params.items() if not (k in legacy and v == legacy[k])}


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class Stage:
    kind: str
    label: str
    params: dict[str, Any]
    deps: list["Stage"]
    root: Path
    key: str = ""

    def __post_init__(self) -> None:
        self.key = config_hash({"kind": self.kind, "params": self.params, "deps": [d.key for d in self.deps]})

    @property
    def dir(self) -> Path:
        return self.root / self.kind / f"{self.label}-{self.key}"

    @property
    def done(self) -> bool:
        return read_record(self.dir / DONE_FILE) is not None


@dataclass
class Plan:
    stages: list[Stage]
    experts: Stage
    sft: dict[int | None, Stage]  # lineage (seed, or None when shared) -> SFT stage
    runs: dict[tuple[str, int], Stage]  # (arm, seed) -> train stage, or the SFT stage for arms without one
    evals: dict[tuple[str, int, str], Stage]  # (arm, seed, split) -> evaluate stage
    splits_file: Path | None
    train_tasks: int | None
    eval_tasks: dict[str, int | None]


class KindEntry(Protocol):
    """What the plan needs of a stage kind's registry entry (``kinds.StageKind``): its name, in running order, and
    for a kind outside the built-in DAG the function that adds its stages to a built plan."""

    name: str
    expand: Callable[[Experiment, Plan], Iterable[Stage]] | None


def sciworld_protocol(exp: Experiment) -> dict[str, Any] | None:
    """The derived ScienceWorld protocol (task types and variations cut), or None for other benchmarks."""
    if exp.benchmark.name != "sciworld":
        return None
    from hpl_lightning.envs.sciworld import DEFAULT_SPLITS

    raw = json.loads(Path(exp.benchmark.splits_file or DEFAULT_SPLITS).read_text())
    b = exp.benchmark
    unknown = set(b.task_types or []) - set(raw["max_steps"])
    if unknown:
        raise UsageError(f"benchmark.task_types: unknown ScienceWorld task types {sorted(unknown)}")
    for split in [b.train_split, *b.eval_splits]:
        if split not in raw["splits"]:
            raise UsageError(f"benchmark: split {split!r} is not in {sorted(raw['splits'])}")

    def cut(split: str, per_type: int | None) -> list[list[Any]]:
        taken: dict[str, int] = defaultdict(int)
        out = []
        for name, variation in raw["splits"][split]:
            if b.task_types is not None and name not in b.task_types:
                continue
            if per_type is None or taken[name] < per_type:
                taken[name] += 1
                out.append([name, variation])
        return out

    splits = {s: cut(s, b.train_per_type if s == b.train_split else b.eval_per_type) for s in raw["splits"]}
    return {**raw, "splits": splits}


def build_plan(exp: Experiment, kinds: Sequence[KindEntry]) -> Plan:
    """Every stage of ``exp``, each kind's stages in the order of ``kinds``, dependencies first."""
    root, b = exp.root, exp.benchmark
    protocol = sciworld_protocol(exp)
    splits_file = root / f"splits-{config_hash(protocol)}.json" if protocol is not None else None

    def data_id(split: str) -> str | None:
        """What a stage of ``split`` depends on: its tasks and budgets (not the other splits' cut)."""
        if protocol is None:
            return None
        return config_hash({"tasks": protocol["splits"][split], "max_steps": protocol["max_steps"]})

    limit = exp.evaluation.limit
    eval_tasks = {s: (len(protocol["splits"][s][:limit]) if protocol else limit) for s in b.eval_splits}
    train_tasks = len(protocol["splits"][b.train_split][: b.expert_limit]) if protocol else b.expert_limit
    training = {"config": Path(exp.training.config).read_text() if exp.training.config else None,
                "options": flatten(exp.training.options)}
    backend = {"served": exp.serving.base_url is not None}

    experts = Stage("experts", f"{b.name}-{b.train_split}", {
        "benchmark": b.name, "split": b.train_split, "source": b.expert_source, "input": b.expert_input,
        "limit": b.expert_limit, "protocol": data_id(b.train_split)}, [], root)
    stages = [experts]
    lineages: list[int | None] = list(exp.seeds) if exp.sft_cfg.per_seed else [None]
    sft: dict[int | None, Stage] = {}
    runs: dict[tuple[str, int], Stage] = {}
    evals: dict[tuple[str, int, str], Stage] = {}
    base_levels = sorted({lv for r in exp.recipes.values() for lv in r.levels if lv != "group"},
                         key=PREFERENCE_LEVELS.index)
    group_segmenters = sorted({r.segmenter for r in exp.recipes.values() if "group" in r.levels})
    explore_params = {**without_added_later(asdict(exp.exploration), "exploration"), **backend,
                      "env_kwargs": b.env_kwargs}
    explore_params["config"] = without_added_later(explore_params["config"], "exploration.config")

    def add(stage: Stage) -> Stage:
        for s in stages:
            if s.kind == stage.kind and s.key == stage.key:
                return s  # the same work asked for twice (e.g. greedy evaluation of a shared SFT model)
        stages.append(stage)
        return stage

    for lineage in lineages:
        seed = exp.sft_cfg.seed if lineage is None else lineage
        tag = f"sft{seed}"  # the same directory for the same SFT model, shared or per seed
        # hashed by the options the run gets (training.options under sft.options; one sft.options sets to null is
        # not given): a training option that sft.options overrides or unsets does not retrain the SFT model
        sft_options = {k: v for k, v in {**training["options"], **SFT_DEFAULTS, **flatten(exp.sft_cfg.options)}.items()
                       if v is not None}
        sft[lineage] = add(Stage("sft", tag, {"model": exp.model, "training_config": training["config"],
                                              "options": sft_options, "seed": seed}, [experts], root))
        # a lineage of its own (sft.per_seed) also samples its rollouts with its seed
        lineage_explore = {**explore_params, "seed": exp.exploration.seed if lineage is None else lineage}
        explore = None
        if base_levels:
            explore = add(Stage("explore", tag, {**lineage_explore, "levels": base_levels},
                                [experts, sft[lineage]], root))
        segmented: dict[str, Stage] = {}
        explored_groups: dict[str, Stage] = {}
        for name in group_segmenters:
            uses_reference = name == "uncertainty"
            segmented[name] = add(Stage("segment", f"{name}-{tag}",
                                        {"segmenter": name, "options": exp.segmenters[name]},
                                        [experts, *([sft[lineage]] if uses_reference else [])], root))
            explored_groups[name] = add(Stage("explore_group", f"{name}-{tag}",
                                              {**lineage_explore, "levels": ["group"]},
                                              [segmented[name], sft[lineage]], root))
        for seed_ in (exp.seeds if lineage is None else [lineage]):
            for arm, recipe in exp.recipes.items():
                if not recipe.levels:
                    runs[(arm, seed_)] = sft[lineage]
                    continue
                source = segmented[recipe.segmenter] if "group" in recipe.levels else experts
                rollouts = [explore] if set(recipe.levels) - {"group"} else []
                if "group" in recipe.levels:
                    rollouts.append(explored_groups[recipe.segmenter])
                pair_stage = add(Stage("pairs", f"{recipe.segmenter or 'none'}-{'-'.join(recipe.levels)}-{tag}",
                                       {"levels": list(recipe.levels),
                                        "filters": without_added_later(asdict(exp.pair_filters), "pairs.filters"),
                                        "max_negatives": exp.exploration.config.max_negatives},
                                       [source, *rollouts], root))
                runs[(arm, seed_)] = add(Stage("train", f"{arm}-s{seed_}",
                                               {"training": training, "options": recipe.options, "seed": seed_},
                                               [pair_stage, sft[lineage]], root))
    for (arm, seed_), run in runs.items():
        for split in b.eval_splits:
            sampling = exp.evaluation.temperature > 0
            settings = {k: v for k, v in without_added_later(asdict(exp.evaluation), "evaluation").items()
                        if k not in STATISTICS_ONLY}
            params = {**settings, **backend, "split": split, "protocol": data_id(split),
                      "env_kwargs": b.env_kwargs, "sampling_seed": seed_ if sampling else None}
            label = f"{run.label}-{split}" + (f"-sampling{seed_}" if sampling else "")
            evals[(arm, seed_, split)] = add(Stage("evaluate", label, params, [run], root))
    plan = Plan(stages, experts, sft, runs, evals, splits_file, train_tasks, eval_tasks)
    for kind in kinds:
        if kind.expand is not None:
            for stage in kind.expand(exp, plan):
                add(stage)
    order = {k.name: i for i, k in enumerate(kinds)}
    unknown = sorted({s.kind for s in stages} - set(order))
    if unknown:
        raise ValueError(f"stage kinds {unknown} are not in the registry of stage kinds")
    stages.sort(key=lambda s: order[s.kind])  # stable: each kind in creation order, dependencies first
    return plan


def needed(plan: Plan, done: set[str]) -> set[str]:
    """Keys of the unfinished stages an unfinished evaluation depends on (``done``: keys of finished stages):
    training, exploration or SFT whose evaluations are all done (restored from results_dir) need not run. A kind
    added to the plan by ``expand`` is a leaf like an evaluation: it is needed until it is done."""
    required: set[str] = set()
    fed = {d.key for s in plan.stages for d in s.deps}
    todo = [s for s in plan.stages if (s.kind == "evaluate" or s.key not in fed) and s.key not in done]
    while todo:
        st = todo.pop()
        if st.key not in required:
            required.add(st.key)
            todo.extend(d for d in st.deps if d.key not in done)
    return required
