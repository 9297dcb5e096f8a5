"""The HPL experiment runner: expert data in, a results table with confidence intervals out, resumably.

    python -m hpl_lightning.experiment -c configs/experiments/sciworld-cpu-small.yaml --dry_run   # the plan only
    python -m hpl_lightning.experiment -c configs/experiments/sciworld-cpu-small.yaml             # run / resume
    python -m hpl_lightning.experiment -c EXP.yaml --shard 3/8 --stage explore                    # one SLURM task

Stages (each a directory ``<output_dir>/<kind>/<label>-<hash>/`` keyed by the hash of everything that determines
its outputs, finished when it holds ``done.json``): expert import -> SFT (``train.py fit`` on the experts, exported
as a model directory) -> exploration of the trajectory and step levels with the SFT policy -> segmentation per
segmenter -> group-level exploration per segmenter -> pairs per (segmenter, levels) -> one preference run per
(arm, seed) -> evaluation of every checkpoint on every split -> ``results.md``/``results.json``/``results.png``.
A re-run skips finished stages; a killed stage continues where it stopped (exploration and evaluation append and
skip what is in their files; training resumes from ``last.ckpt`` with ``--ckpt_path last``). Changing a setting
changes the hashes of the stages it feeds, and only those run again.

Processes: training runs as a subprocess per run (``python -m hpl_lightning.cli fit``): Lightning's DDP launcher
re-executes its command line, a run's memory (GPU included) is returned when it ends, and a run can be killed
alone. Everything else (import, exploration, segmentation, pairs, evaluation) calls the pipeline and evaluation
functions in this process: they are resumable functions, and a subprocess would spend more on start-up than on the
toy-sized stages.

What a seed changes (``seeds``): the preference stage's ``seed_everything`` and ``data.seed`` (batch order within
each curriculum phase, dropout), and evaluation sampling when ``evaluation.temperature`` > 0 (greedy evaluation,
the default and the paper's, is the same for every seed). The SFT model, and with it the exploration data, the
segmentation and the pairs, is shared by all seeds unless ``sft.per_seed`` (then each seed trains its own SFT model
with that seed -- and its own init for config-only models -- and explores with it, sampling with that seed). Every
arm of a seed starts from the same SFT model and the same exploration data, so arms differ only in their objective.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from hpl_lightning.explore import ExploreConfig
from hpl_lightning.pairs import PairFilters
from hpl_lightning.results import machine, write_results

PREFERENCE_LEVELS = ("trajectory", "step", "group")
# In running order. Segmentation comes before exploration so one sharded pass (--stage explore) covers both levels.
STAGE_KINDS = ("experts", "sft", "segment", "explore", "explore_group", "pairs", "train", "evaluate")
SHARDABLE = ("explore", "evaluate")  # --stage explore shards explore and explore_group stages
DONE_FILE = "done.json"
# The SFT stage is behaviour cloning on the experts: one curriculum phase, one pass; sft.options overrides (e.g.
# three epochs: data.schedule {unit: epochs, length: 3} with trainer.max_epochs 3).
SFT_DEFAULTS = {"data.curriculum.mode": "static", "trainer.max_epochs": 1}
# Evaluation settings that change how results are summarised or how fast, not the episodes: not part of the hash.
STATISTICS_ONLY = ("bootstrap_resamples", "confidence", "baselines", "threads")
KILL_AFTER_ENV = "HPL_EXPERIMENT_KILL_AFTER"  # testing hook: SIGKILL the runner after this many stages ran


# ------------------------------------------------------------------------------------------------ configuration
@dataclass
class Benchmark:
    """What is trained on and evaluated. ScienceWorld subsets are cut from ``splits.json`` (a derived copy is
    written to the experiment directory): ``task_types`` and the first ``*_per_type`` variations of each type."""

    name: str = "sciworld"
    train_split: str = "train"
    eval_splits: list[str] = field(default_factory=lambda: ["dev", "test"])
    task_types: list[str] | None = None
    train_per_type: int | None = None
    eval_per_type: int | None = None
    splits_file: str | None = None  # sciworld: default the shared splits.json
    expert_source: str = "sciworld_gold"  # or intercode, sharegpt, conversations (``pipeline import``)
    expert_input: str | None = None
    expert_limit: int | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Training:
    """Options of every ``train.py fit`` run (SFT and preference): a base YAML and dotted overrides."""

    config: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SFT:
    """The SFT stage: behaviour cloning on the experts (one curriculum phase, ``SFT_DEFAULTS``) with these
    ``train.py`` options on top of ``training``; ``per_seed``: one SFT model per seed."""

    options: dict[str, Any] = field(default_factory=dict)
    per_seed: bool = False
    seed: int = 0  # the shared SFT model's seed (when not per_seed)


@dataclass
class Exploration:
    """``pipeline explore`` settings (the levels come from the arms)."""

    config: ExploreConfig = ExploreConfig()
    max_new_tokens: int = 512
    temperature: float = 1.0
    envs: int = 4
    batch_size: int = 16
    threads: int | None = None
    seed: int = 0


@dataclass
class Evaluation:
    """Evaluation of every checkpoint on every ``benchmark.eval_splits``; greedy unless ``temperature`` > 0."""

    workers: int = 4
    max_new_tokens: int = 512
    temperature: float = 0.0
    batch_size: int = 16
    threads: int | None = None
    limit: int | None = None  # first N tasks of each split
    bootstrap_resamples: int = 10_000
    confidence: float = 0.95
    baselines: list[str] = field(default_factory=lambda: ["sft", "eto"])  # paired comparisons: every arm vs these


@dataclass
class Serving:
    """A served policy (vLLM or any OpenAI-compatible server) for exploration and evaluation.

    With ``command`` the runner starts it for every model it needs (``{model}``: model directory, ``{name}``: the
    name to serve it as, ``{port}``: from ``base_url``) and stops it after; without, the server at ``base_url`` must
    already serve the model directory the runner names (vLLM's default name for ``vllm serve DIR`` is DIR).
    """

    base_url: str | None = None
    command: str | None = None
    startup_timeout: float = 900.0
    concurrency: int = 64


@dataclass
class Arm:
    """A training recipe: a built-in arm (``base``) with other levels, segmenter or ``train.py`` options."""

    base: str = "hpl"
    levels: list[str] | None = None
    segmenter: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cost:
    """Rough seconds per unit for the printed plan (measure them; see the configs' headers). None: unknown."""

    sft_run: float | None = None
    explore_task: float | None = None  # per training task, trajectory + step levels
    explore_group_task: float | None = None  # per training task and segmenter
    train_run: float | None = None
    eval_episode: float | None = None


@dataclass(frozen=True)
class Recipe:
    """What an arm trains: no preference stage (``levels`` empty: the SFT model itself) or pairs of ``levels``
    from ``segmenter``'s groups, with ``train.py`` options."""

    levels: tuple[str, ...]
    segmenter: str | None
    options: dict[str, Any]


def builtin_recipe(name: str, segmenters: Sequence[str], ablation_segmenter: str) -> Recipe | None:
    """The paper's arms. BC (expert NLL) is in every preference arm: the pairs file holds the expert trajectories."""
    if name == "sft":
        return Recipe((), None, {})
    if name == "eto":
        return Recipe(("trajectory",), None, {})
    if name == "ipr":
        return Recipe(("trajectory", "step"), None, {})
    hpl = {"data.curriculum.mode": "dual"}
    ablations = {
        "hpl": {},
        "hpl-no-group": {"model.weights.group": 0.0},  # same data and batches as HPL, group loss off
        "hpl-static": {"data.curriculum.mode": "static", "trainer.max_epochs": 1},  # one phase = one epoch
        "hpl-length-only": {"data.curriculum.mode": "length"},
        "hpl-difficulty-only": {"data.curriculum.mode": "difficulty"},
    }
    if name in ablations:
        return Recipe(PREFERENCE_LEVELS, ablation_segmenter, {**hpl, **ablations[name]})
    if name.startswith("hpl-") and name[4:] in segmenters:
        return Recipe(PREFERENCE_LEVELS, name[4:], hpl)
    return None


# ------------------------------------------------------------------------------------------------ helpers
def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def flatten(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c.d": 2} -> {"a.b": 1, "c.d": 2}: nested and dotted option maps merge key by key."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not {"class_path", "init_args"} & set(value):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def unflatten(options: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


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
            raise ValueError(f"--shard {text!r}: expected K/N, e.g. 0/8") from None
        if not 0 <= k < n:
            raise ValueError(f"--shard {text!r}: K must be in 0..N-1")
        return cls(k, n)

    def select(self, ids: Sequence[str]) -> list[str]:
        return [t for i, t in enumerate(sorted(ids)) if i % self.count == self.index]

    @property
    def label(self) -> str:
        return f"{self.index}-of-{self.count}"


def merge_shards(parts: dict[int, tuple[list[str], list[dict[str, Any]]]], count: int, all_ids: Sequence[str],
                 task_field: str) -> list[dict[str, Any]]:
    """Concatenates the records of shards 0..count-1, checking every task is in exactly one finished shard and
    every record belongs to its shard's tasks."""
    missing = sorted(set(range(count)) - set(parts))
    if missing:
        raise ValueError(f"shards {missing} of {count} are not finished; run them (--shard K/{count}) first")
    owner: dict[str, int] = {}
    for k, (ids, _) in parts.items():
        for t in ids:
            if t in owner:
                raise ValueError(f"task {t} is in shards {owner[t]} and {k}")
            owner[t] = k
    absent = sorted(set(all_ids) - set(owner))
    if absent:
        raise ValueError(f"{len(absent)} task(s) in no shard, e.g. {absent[:3]}")
    records = []
    for k in sorted(parts):
        for r in parts[k][1]:
            if owner.get(r[task_field]) != k:
                raise ValueError(f"shard {k} holds a record of task {r[task_field]}, which is not its task")
            records.append(r)
    return records


def _matches(kind: str, wanted: str | None) -> bool:
    """``explore`` (in --stage and --stop_before) stands for both exploration kinds."""
    return kind == wanted or (wanted == "explore" and kind == "explore_group")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ the plan
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
        return (self.dir / DONE_FILE).is_file()

    def shard_dir(self, shard: Shard) -> Path:
        return self.dir / "shards" / shard.label


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


class Experiment:
    """Builds the plan of an experiment config and runs it (see the module docstring)."""

    def __init__(
        self,
        output_dir: str,
        model: str = "hpl-tiny",
        benchmark: Benchmark = Benchmark(),
        training: Training = Training(),
        sft: SFT = SFT(),
        exploration: Exploration = Exploration(),
        segmenters: dict[str, dict[str, Any]] | None = None,
        ablation_segmenter: str = "semantic_embedding",
        arms: list[str] | None = None,
        custom_arms: dict[str, Arm] | None = None,
        pairs: PairFilters = PairFilters(),
        seeds: list[int] | None = None,
        evaluation: Evaluation = Evaluation(),
        serving: Serving = Serving(),
        cost: Cost = Cost(),
        dtype: str = "float32",
        device: str = "cpu",
        results_dir: str | None = None,
        report_notes: list[str] | None = None,
    ):
        """
        Args:
            output_dir: the experiment directory (stages, results).
            model: the base policy (hub name, directory, hpl-tiny, smollm2-135m-instruct).
            benchmark: benchmark, splits and expert data.
            training: options of every train.py run.
            sft: the SFT stage.
            exploration: rollouts of the SFT policy.
            segmenters: segmenter name -> options; ``hpl-<name>`` arms use them.
            ablation_segmenter: the segmenter of hpl, hpl-no-group, hpl-static, hpl-length-only, hpl-difficulty-only.
            arms: arm names: sft, eto, ipr, hpl-<segmenter>, hpl-no-group, hpl-static, hpl-length-only,
                hpl-difficulty-only, or a key of ``custom_arms``.
            custom_arms: user recipes.
            pairs: pair filters (the paper's by default).
            seeds: one preference run per arm and seed.
            evaluation: evaluation settings and statistics.
            serving: a served policy for exploration and evaluation.
            cost: rough seconds per unit, for the plan.
            dtype: local model weights for exploration, segmentation and evaluation.
            device: cpu or cuda for those.
            results_dir: where results.md, results.json and results.png go (default ``output_dir``): e.g. a
                directory under version control, while checkpoints stay in ``output_dir``. When it differs from
                ``output_dir``, every finished stage's record and every evaluation's episodes are copied there too
                (``stages/``), and a later run -- a fresh machine with a checkout of it -- takes those evaluations as
                done and skips the training, exploration and SFT stages that only they needed.
            report_notes: markdown files placed at the top of results.md (a study's pre-registered protocol and
                hypotheses, its outcome); they change no stage.
        """
        self.root = Path(output_dir)
        self.model, self.benchmark, self.training, self.sft_cfg = model, benchmark, training, sft
        self.exploration, self.pair_filters, self.evaluation = exploration, pairs, evaluation
        self.serving, self.cost, self.dtype, self.device = serving, cost, dtype, device
        self.results_dir = Path(results_dir) if results_dir is not None else self.root
        self.report_notes = [Path(n) for n in report_notes or []]
        missing = [str(n) for n in self.report_notes if not n.is_file()]
        if missing:
            raise ValueError(f"report_notes: no such file(s) {missing}")
        self.segmenters = dict(segmenters if segmenters is not None else {"semantic_embedding": {}})
        self.ablation_segmenter = ablation_segmenter
        self.arm_names = list(arms if arms is not None else ["sft", "eto", "ipr", "hpl-semantic_embedding"])
        self.custom_arms = dict(custom_arms or {})
        self.seeds = list(seeds if seeds is not None else [0])
        self._check_segmenters()
        self.recipes = {name: self._recipe(i, name) for i, name in enumerate(self.arm_names)}
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {self.seeds}")
        if len(set(self.arm_names)) != len(self.arm_names):
            raise ValueError(f"arms: {self.arm_names} names an arm twice")

    # -- arms ----------------------------------------------------------------------------------------------------
    def _check_segmenters(self) -> None:
        """Unknown segmenters or option names fail here, before any stage runs (building one may load a model)."""
        from dataclasses import fields

        from hpl_lightning.segmentation import SEGMENTERS

        for name, options in self.segmenters.items():
            if name not in SEGMENTERS:
                raise ValueError(f"segmenters.{name}: unknown segmenter; expected one of {sorted(SEGMENTERS)}")
            unknown = set(options) - {f.name for f in fields(SEGMENTERS[name].config_class)}
            if unknown:
                raise ValueError(f"segmenters.{name}: unknown options {sorted(unknown)}")

    def _recipe(self, i: int, name: str) -> Recipe:
        where = f"arms[{i}] ({name!r})"
        if name in self.custom_arms:
            arm = self.custom_arms[name]
            base = builtin_recipe(arm.base, list(self.segmenters), self.ablation_segmenter)
            if base is None:
                raise ValueError(f"custom_arms.{name}.base: unknown built-in arm {arm.base!r}")
            recipe = Recipe(tuple(arm.levels) if arm.levels is not None else base.levels,
                            arm.segmenter or base.segmenter, {**flatten(base.options), **flatten(arm.options)})
        else:
            recipe = builtin_recipe(name, list(self.segmenters), self.ablation_segmenter)
            if recipe is None:
                raise ValueError(
                    f"{where}: unknown arm; built-in: sft, eto, ipr, hpl, hpl-<segmenter> for segmenters "
                    f"{sorted(self.segmenters)}, hpl-no-group, hpl-static, hpl-length-only, hpl-difficulty-only; "
                    f"or a key of custom_arms {sorted(self.custom_arms)}")
        unknown = set(recipe.levels) - set(PREFERENCE_LEVELS)
        if unknown:
            raise ValueError(f"{where}: unknown levels {sorted(unknown)}")
        if "group" in recipe.levels and recipe.segmenter not in self.segmenters:
            raise ValueError(f"{where}: segmenter {recipe.segmenter!r} is not in segmenters {sorted(self.segmenters)}")
        return recipe

    # -- the plan ------------------------------------------------------------------------------------------------
    def sciworld_splits(self) -> dict[str, Any] | None:
        """The derived ScienceWorld protocol (task types and variations cut), or None for other benchmarks."""
        if self.benchmark.name != "sciworld":
            return None
        from hpl_lightning.envs.sciworld import DEFAULT_SPLITS

        raw = json.loads(Path(self.benchmark.splits_file or DEFAULT_SPLITS).read_text())
        b = self.benchmark
        unknown = set(b.task_types or []) - set(raw["max_steps"])
        if unknown:
            raise ValueError(f"benchmark.task_types: unknown ScienceWorld task types {sorted(unknown)}")
        for split in [b.train_split, *b.eval_splits]:
            if split not in raw["splits"]:
                raise ValueError(f"benchmark: split {split!r} is not in {sorted(raw['splits'])}")

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

    def plan(self) -> Plan:
        root, b = self.root, self.benchmark
        protocol = self.sciworld_splits()
        splits_file = root / f"splits-{config_hash(protocol)}.json" if protocol is not None else None

        def data_id(split: str) -> str | None:
            """What a stage of ``split`` depends on: its tasks and budgets (not the other splits' cut)."""
            if protocol is None:
                return None
            return config_hash({"tasks": protocol["splits"][split], "max_steps": protocol["max_steps"]})

        limit = self.evaluation.limit
        eval_tasks = {s: (len(protocol["splits"][s][:limit]) if protocol else limit) for s in b.eval_splits}
        train_tasks = len(protocol["splits"][b.train_split][: b.expert_limit]) if protocol else b.expert_limit
        training = {"config": Path(self.training.config).read_text() if self.training.config else None,
                    "options": flatten(self.training.options)}
        backend = {"served": self.serving.base_url is not None}

        experts = Stage("experts", f"{b.name}-{b.train_split}", {
            "benchmark": b.name, "split": b.train_split, "source": b.expert_source, "input": b.expert_input,
            "limit": b.expert_limit, "protocol": data_id(b.train_split)}, [], root)
        stages = [experts]
        lineages: list[int | None] = list(self.seeds) if self.sft_cfg.per_seed else [None]
        sft: dict[int | None, Stage] = {}
        runs: dict[tuple[str, int], Stage] = {}
        evals: dict[tuple[str, int, str], Stage] = {}
        base_levels = sorted({lv for r in self.recipes.values() for lv in r.levels if lv != "group"},
                             key=PREFERENCE_LEVELS.index)
        group_segmenters = sorted({r.segmenter for r in self.recipes.values() if "group" in r.levels})
        explore_params = {**asdict(self.exploration), **backend, "env_kwargs": b.env_kwargs}

        def add(stage: Stage) -> Stage:
            for s in stages:
                if s.kind == stage.kind and s.key == stage.key:
                    return s  # the same work asked for twice (e.g. greedy evaluation of a shared SFT model)
            stages.append(stage)
            return stage

        for lineage in lineages:
            seed = self.sft_cfg.seed if lineage is None else lineage
            tag = f"sft{seed}"  # the same directory for the same SFT model, shared or per seed
            # hashed by the options the run gets (training.options under sft.options): a training option that
            # sft.options overrides does not retrain the SFT model
            sft_options = {**SFT_DEFAULTS, **flatten(self.sft_cfg.options)}
            sft[lineage] = add(Stage("sft", tag, {"model": self.model, "training_config": training["config"],
                                                  "options": {**training["options"], **sft_options},
                                                  "seed": seed},
                                     [experts], root))
            # a lineage of its own (sft.per_seed) also samples its rollouts with its seed
            lineage_explore = {**explore_params, "seed": self.exploration.seed if lineage is None else lineage}
            explore = None
            if base_levels:
                explore = add(Stage("explore", tag, {**lineage_explore, "levels": base_levels},
                                    [experts, sft[lineage]], root))
            segmented: dict[str, Stage] = {}
            explored_groups: dict[str, Stage] = {}
            for name in group_segmenters:
                uses_reference = name == "uncertainty"
                segmented[name] = add(Stage("segment", f"{name}-{tag}",
                                            {"segmenter": name, "options": self.segmenters[name]},
                                            [experts, *([sft[lineage]] if uses_reference else [])], root))
                explored_groups[name] = add(Stage("explore_group", f"{name}-{tag}",
                                                  {**lineage_explore, "levels": ["group"]},
                                                  [segmented[name], sft[lineage]], root))
            for seed_ in (self.seeds if lineage is None else [lineage]):
                for arm, recipe in self.recipes.items():
                    if not recipe.levels:
                        runs[(arm, seed_)] = sft[lineage]
                        continue
                    source = segmented[recipe.segmenter] if "group" in recipe.levels else experts
                    rollouts = [explore] if set(recipe.levels) - {"group"} else []
                    if "group" in recipe.levels:
                        rollouts.append(explored_groups[recipe.segmenter])
                    pair_stage = add(Stage("pairs", f"{recipe.segmenter or 'none'}-{'-'.join(recipe.levels)}-{tag}",
                                           {"levels": list(recipe.levels), "filters": asdict(self.pair_filters),
                                            "max_negatives": self.exploration.config.max_negatives},
                                           [source, *rollouts], root))
                    runs[(arm, seed_)] = add(Stage("train", f"{arm}-s{seed_}",
                                                   {"training": training, "options": recipe.options, "seed": seed_},
                                                   [pair_stage, sft[lineage]], root))
        for (arm, seed_), run in runs.items():
            for split in b.eval_splits:
                sampling = self.evaluation.temperature > 0
                settings = {k: v for k, v in asdict(self.evaluation).items() if k not in STATISTICS_ONLY}
                params = {**settings, **backend, "split": split, "protocol": data_id(split),
                          "env_kwargs": b.env_kwargs, "sampling_seed": seed_ if sampling else None}
                label = f"{run.label}-{split}" + (f"-sampling{seed_}" if sampling else "")
                evals[(arm, seed_, split)] = add(Stage("evaluate", label, params, [run], root))
        order = {k: i for i, k in enumerate(STAGE_KINDS)}
        stages.sort(key=lambda s: order[s.kind])  # stable: each kind in creation order, dependencies first
        return Plan(stages, experts, sft, runs, evals, splits_file, train_tasks, eval_tasks)

    def _units(self, st: Stage, plan: Plan) -> tuple[float, float | None]:
        """(units of work, seconds per unit from ``cost``) of a stage, for the printed plan."""
        c = self.cost
        if st.kind == "sft":
            return 1, c.sft_run
        if st.kind in ("explore", "explore_group"):
            return plan.train_tasks or 0, c.explore_task if st.kind == "explore" else c.explore_group_task
        if st.kind == "train":
            return 1, c.train_run
        if st.kind == "evaluate":
            return plan.eval_tasks[st.params["split"]] or 0, c.eval_episode
        return 0, 0.0  # experts, segment, pairs: no generation (uncertainty: one forward per trajectory)

    def status(self, plan: Plan) -> tuple[set[str], set[str]]:
        """Keys of the finished stages (evaluations published in ``results_dir`` count) and of those still to run
        (unfinished and needed by an unfinished evaluation)."""
        done = {s.key for s in plan.stages if s.done or (
            self.publishes and s.kind == "evaluate" and (self._published(s) / DONE_FILE).is_file())}
        return done, self._needed(plan, done)

    def describe_plan(self, plan: Plan) -> str:
        done, to_run = self.status(plan)
        lines = [f"experiment {self.root}: {len(self.arm_names)} arms x {len(self.seeds)} seeds on "
                 f"{self.benchmark.name} "
                 f"({plan.train_tasks if plan.train_tasks is not None else '?'} training tasks; evaluation "
                 + ", ".join(f"{s}: {n if n is not None else 'all'} tasks" for s, n in plan.eval_tasks.items()) + ")",
                 f"arms: {', '.join(self.arm_names)}; seeds: {self.seeds}; "
                 f"SFT models: {sum(s.kind == 'sft' for s in plan.stages)}"]
        total = {"all": 0.0, "to run": 0.0}
        known = True
        for kind in STAGE_KINDS[1:]:
            stages = [s for s in plan.stages if s.kind == kind]
            if not stages:
                continue
            costs = {"all": 0.0, "to run": 0.0}
            priced = True
            for st in stages:
                units, rate = self._units(st, plan)
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
            cost = ("minutes at most" if kind in ("segment", "pairs") else f"~{costs['to run'] / 3600:.2f} h to go"
                    if priced else "cost ?")
            lines.append(f"  {kind:<14} {len(stages):>3} stage(s), {n_done} done, "
                         + (f"{skipped} not needed, " if skipped else "") + f"{n_run} to run  {cost}")
        lines.append(f"rough cost: ~{total['to run'] / 3600:.1f} h to go, ~{total['all'] / 3600:.1f} h for the whole "
                     "plan" if known else "rough cost: unknown (set cost: in the config)")
        return "\n".join(lines)

    # -- running -------------------------------------------------------------------------------------------------
    def run(self, dry_run: bool = False, shard: Shard | None = None, stage: str | None = None,
            stop_before: str | None = None, command: str | None = None) -> dict[str, Any] | None:
        """Runs the plan (or, with ``shard``, the ``stage`` kind's shard of every ready stage of that kind).
        ``command``: how the run was launched, for the report."""
        if shard is not None and stage not in SHARDABLE:
            raise ValueError(f"--shard needs --stage, one of {SHARDABLE}")
        if stop_before is not None and stop_before not in STAGE_KINDS:
            raise ValueError(f"--stop_before: expected one of {STAGE_KINDS}")
        plan = self.plan()
        print(self.describe_plan(plan), flush=True)
        if dry_run:
            return None
        if self.benchmark.name not in ("sciworld", "intercode_sql") and any(
                s.kind in ("explore", "explore_group") for s in plan.stages):
            raise ValueError(f"benchmark.name: exploration supports sciworld and intercode_sql, not "
                             f"{self.benchmark.name!r} (pipeline.task_resolver)")
        self.root.mkdir(parents=True, exist_ok=True)
        if plan.splits_file is not None and not plan.splits_file.exists():
            plan.splits_file.write_text(json.dumps(self.sciworld_splits(), indent=1))
        (self.root / "plan.json").write_text(json.dumps(
            [{"kind": s.kind, "dir": str(s.dir.relative_to(self.root)), "deps": [d.key for d in s.deps]}
             for s in plan.stages], indent=1) + "\n")
        if self.publishes:
            for st in plan.stages:
                if st.done and not (self._published(st) / DONE_FILE).is_file():
                    self._publish(st)  # finished by a run that did not publish (yet)
                elif not st.done and self._restore(st):
                    print(f"{st.kind} {st.label}: taken from {self._published(st)}", flush=True)
        needed = self._needed(plan, {s.key for s in plan.stages if s.done})
        kill_after = int(os.environ.get(KILL_AFTER_ENV, "0"))
        ran = 0
        for i, st in enumerate(plan.stages, start=1):
            head = f"[{i}/{len(plan.stages)}] {st.kind} {st.label}"
            if st.done:
                print(f"{head}: done earlier ({st.dir.relative_to(self.root)})", flush=True)
                continue
            if st.key not in needed:
                print(f"{head}: not needed (every evaluation it feeds is done)", flush=True)
                continue
            if shard is not None:
                if not _matches(st.kind, stage):
                    continue
                if not all(d.done for d in st.deps):
                    print(f"{head}: waiting for {[d.kind for d in st.deps if not d.done]}", flush=True)
                    continue
                marker = st.shard_dir(shard) / DONE_FILE
                if marker.exists():
                    print(f"{head} shard {shard.label}: done earlier", flush=True)
                    continue
            elif stop_before is not None and _matches(st.kind, stop_before):
                print(f"{head}: stopping before {stop_before} (--stop_before)", flush=True)
                return None
            t0 = time.perf_counter()
            print(f"{head}: running -> {st.dir.relative_to(self.root)}", flush=True)
            result = getattr(self, f"_{st.kind}")(st, plan, shard)
            self._release_device()
            seconds = time.perf_counter() - t0
            target = (st.shard_dir(shard) if shard is not None else st.dir) / DONE_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps({"kind": st.kind, "key": st.key, "params": st.params,
                                          "deps": [d.key for d in st.deps], "seconds": seconds, "machine": machine(),
                                          "result": result}, indent=1, default=str) + "\n")
            print(f"{head}: finished in {seconds:.0f} s", flush=True)
            if shard is None and self.publishes:
                self._publish(st)
            ran += 1
            if kill_after and ran >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        if shard is not None:
            return None
        from hpl_lightning.evaluation import EPISODES_FILE

        evals = {k: (st.key, st.dir / EPISODES_FILE) for k, st in plan.evals.items()}
        config = {"model": self.model, "benchmark": asdict(self.benchmark), "training": asdict(self.training),
                  "sft": asdict(self.sft_cfg), "exploration": asdict(self.exploration), "segmenters": self.segmenters,
                  "arms": {a: asdict(r) for a, r in self.recipes.items()}, "seeds": self.seeds,
                  "evaluation": asdict(self.evaluation), "pairs": asdict(self.pair_filters)}
        title = f"{self.benchmark.name}: {self.model}, {len(self.seeds)} seed(s)"
        seconds: dict[str, float] = defaultdict(float)  # wall time per stage kind (shards summed), from done.json
        machines: Counter[str] = Counter()
        for st in plan.stages:
            published = self._published(st) / DONE_FILE
            # the published record covers stages this machine never ran (and sums their shards)
            records = ([json.loads(published.read_text())] if self.publishes and published.is_file()
                       else self._records(st))
            seconds[st.kind] += sum(r["seconds"] for r in records)
            machines.update({r.get("machine", "not recorded (finished before the runner recorded machines)")
                             for r in records})  # a stage sharded over several machines counts on each
        provenance = {"command": command, "revision": self._revision(), "report_machine": machine(),
                      "stage_machines": dict(machines)}
        return write_results(self.results_dir, title, self.arm_names, self.benchmark.eval_splits, evals,
                             self.evaluation.bootstrap_resamples, self.evaluation.confidence, config, dict(seconds),
                             [n.read_text(encoding="utf-8") for n in self.report_notes], self.evaluation.baselines,
                             provenance)

    # -- publishing: results_dir keeps what a later run needs to skip finished work (never checkpoints) ----------
    @property
    def publishes(self) -> bool:
        return self.results_dir.resolve() != self.root.resolve()

    def _published(self, st: Stage) -> Path:
        return self.results_dir / "stages" / st.kind / st.dir.name

    @staticmethod
    def _records(st: Stage) -> list[dict[str, Any]]:
        """The done.json records of a stage here: its own, or its finished shards' (a sharded stage)."""
        markers = [st.dir / DONE_FILE, *st.dir.glob(f"shards/*/{DONE_FILE}")]
        return [json.loads(m.read_text()) for m in markers if m.is_file()]

    @classmethod
    def _stage_seconds(cls, st: Stage) -> float:
        return sum(r["seconds"] for r in cls._records(st))

    def _revision(self) -> str | None:
        """The checkout's git commit, marked when tracked files other than the results differ from it (None
        outside git): which code produced a report."""
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()

        try:
            head = git("rev-parse", "--short=12", "HEAD")
            top = Path(git("rev-parse", "--show-toplevel"))
            results = self.results_dir.resolve()
            exclude = ([f":(exclude,top){results.relative_to(top)}"] if results.is_relative_to(top) else [])
            dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/", *exclude)
        except (OSError, subprocess.CalledProcessError):
            return None
        return f"{head} + uncommitted changes" if dirty else head

    def _publish(self, st: Stage) -> None:
        """Copies a finished stage's record (wall time, result) and an evaluation's episodes to results_dir."""
        from hpl_lightning.evaluation import EPISODES_FILE

        out = self._published(st)
        out.mkdir(parents=True, exist_ok=True)
        if st.kind == "evaluate":  # before the record: a published record means its episodes are complete
            shutil.copyfile(st.dir / EPISODES_FILE, out / EPISODES_FILE)
        record = {**json.loads((st.dir / DONE_FILE).read_text()), "seconds": self._stage_seconds(st),
                  "fingerprint": self._fingerprint(st)}
        previous = out / DONE_FILE
        if previous.is_file():  # a stage run again (a fresh machine): did it reproduce what was published?
            before = json.loads(previous.read_text()).get("fingerprint")
            if before is not None and before != record["fingerprint"]:
                record["previous_fingerprint"] = before
                print(f"WARNING: {st.kind} {st.label} did not reproduce its published outputs ({before} -> "
                      f"{record['fingerprint']}): evaluations published earlier come from the other version",
                      flush=True)
        previous.write_text(json.dumps(record, indent=1, default=str) + "\n")

    @staticmethod
    def _fingerprint(st: Stage) -> str | None:
        """sha256 of what a stage produced (model weights, rollouts, segments, pairs, episodes)."""
        files = sorted(p for pattern in ("model/*.safetensors", "*.jsonl") for p in st.dir.glob(pattern))
        if not files:
            return None
        digest = hashlib.sha256()
        for path in files:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]

    def _restore(self, st: Stage) -> bool:
        """A published evaluation (e.g. committed by a run on another machine) becomes done here."""
        from hpl_lightning.evaluation import EPISODES_FILE

        src = self._published(st)
        if st.kind != "evaluate" or not (src / DONE_FILE).is_file():
            return False
        st.dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / EPISODES_FILE, st.dir / EPISODES_FILE)
        shutil.copyfile(src / DONE_FILE, st.dir / DONE_FILE)
        return True

    @staticmethod
    def _needed(plan: Plan, done: set[str]) -> set[str]:
        """Keys of the unfinished stages an unfinished evaluation depends on (``done``: keys of finished stages):
        training, exploration or SFT whose evaluations are all done (restored from results_dir) need not run."""
        needed: set[str] = set()
        todo = [s for s in plan.stages if s.kind == "evaluate" and s.key not in done]
        while todo:
            st = todo.pop()
            if st.key not in needed:
                needed.add(st.key)
                todo.extend(d for d in st.deps if d.key not in done)
        return needed

    def _release_device(self) -> None:
        """Returns the GPU memory an in-process stage cached, so the next training subprocess finds it free."""
        if self.device.startswith("cuda"):
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

    # -- stages --------------------------------------------------------------------------------------------------
    def _env_kwargs(self, plan: Plan) -> dict[str, Any]:
        kwargs = dict(self.benchmark.env_kwargs)
        if plan.splits_file is not None:
            kwargs["splits"] = str(plan.splits_file)
        if self.benchmark.name == "intercode_sql" and "db_url" not in kwargs:
            from hpl_lightning.envs.intercode_replay import start_server

            kwargs["db_url"] = start_server()
        return kwargs

    def _experts(self, st: Stage, plan: Plan, shard: Shard | None) -> dict[str, Any]:
        from hpl_lightning import pipeline

        b = self.benchmark
        st.dir.mkdir(parents=True, exist_ok=True)
        n = pipeline.import_(str(st.dir / "experts.jsonl"), input=b.expert_input, source=b.expert_source,
                             limit=b.expert_limit, split=b.train_split,
                             splits=str(plan.splits_file) if plan.splits_file else None,
                             workers=self.exploration.envs)
        return {"trajectories": n}

    def _train_process(self, st: Stage, options: dict[str, Any]) -> Path:
        """``python -m hpl_lightning.cli fit`` with the merged options, resumed from its last.ckpt if any."""
        st.dir.mkdir(parents=True, exist_ok=True)
        (st.dir / "train.yaml").write_text(json.dumps(unflatten(options), indent=1))  # JSON is YAML
        cmd = [sys.executable, "-m", "hpl_lightning.cli", "fit"]
        if self.training.config:
            cmd += ["-c", self.training.config]
        cmd += ["-c", str(st.dir / "train.yaml"), "--ckpt_path", "last"]
        with open(st.dir / "train.log", "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = (st.dir / "train.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"training {st.label} failed (exit {done.returncode}); log {st.dir / 'train.log'}:\n{tail}")
        ckpt = st.dir / "ckpt" / "last.ckpt"
        if not ckpt.is_file():
            raise RuntimeError(f"training {st.label} ended without {ckpt}")
        return ckpt

    def _run_options(self, st: Stage, policy: str, train_path: str, seed: int,
                     recipe: dict[str, Any]) -> dict[str, Any]:
        owned = {  # the runner decides where things go and what the seed is
            "seed_everything": seed,
            "model.policy": policy,
            "data.train_path": train_path,
            "data.seed": seed,
            "trainer.default_root_dir": str(st.dir),
            "trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(st.dir), "name": "logs", "version": 0}},
            "checkpoint.dirpath": str(st.dir / "ckpt"),
        }
        return {**flatten(self.training.options), **recipe, **owned}

    def _sft(self, st: Stage, plan: Plan, shard: Shard | None) -> dict[str, Any]:
        from hpl_lightning.export import export

        options = self._run_options(st, self.model, str(plan.experts.dir / "experts.jsonl"), st.params["seed"],
                                    st.params["options"])
        options["model.init_seed"] = st.params["seed"]
        ckpt = self._train_process(st, options)
        export(str(ckpt), str(st.dir / "model"))
        return {"model": str(st.dir / "model")}

    def _policy_kwargs(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "device": self.device}

    @contextlib.contextmanager
    def _served(self, model_dir: Path) -> Iterator[tuple[str, str | None]]:
        """(policy name, base_url) for ``model_dir``: the directory itself locally, or a served model."""
        s = self.serving
        if s.base_url is None:
            yield str(model_dir), None
            return
        name = str(model_dir)
        if s.command is None:
            yield name, s.base_url
            return
        port = s.base_url.rsplit(":", 1)[-1].split("/")[0]
        cmd = s.command.format(model=shlex.quote(str(model_dir)), name=shlex.quote(name), port=port)
        log = open(model_dir.parent / "server.log", "a")
        proc = subprocess.Popen(cmd, shell=True, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + s.startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited ({proc.returncode}); see {model_dir.parent / 'server.log'}")
                try:
                    with urllib.request.urlopen(s.base_url.rstrip("/") + "/models", timeout=5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the server did not answer at {s.base_url} in {s.startup_timeout} s")
                    time.sleep(2)
            yield name, s.base_url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            log.close()

    def _explore(self, st: Stage, plan: Plan, shard: Shard | None) -> dict[str, Any]:
        from hpl_lightning import pipeline

        experts_stage = st.deps[0]
        experts = experts_stage.dir / ("experts.jsonl" if experts_stage.kind == "experts" else "segmented.jsonl")
        all_ids = [r["id"] for r in read_jsonl(experts)]
        out = st.shard_dir(shard) if shard is not None else st.dir
        if shard is None and (st.dir / "shards").is_dir():
            return self._merge(st, all_ids, "rollouts.jsonl", "task_id")
        ids = shard.select(all_ids) if shard is not None else all_ids
        e = self.exploration
        with self._served(st.deps[1].dir / "model") as (policy, base_url):
            summary = pipeline.explore(
                str(experts), str(out / "rollouts.jsonl"), self.benchmark.name,
                replace(e.config, levels=tuple(st.params["levels"])), policy, base_url, e.envs, None, ids,
                e.max_new_tokens, e.temperature, e.batch_size, e.threads, st.params["seed"], self.dtype, self.device,
                None, self._env_kwargs(plan), progress=False)
        return {"tasks": ids, "rollouts": summary.get("rollouts")}

    _explore_group = _explore

    def _merge(self, st: Stage, all_ids: list[str], filename: str, task_field: str) -> dict[str, Any]:
        parts = {}
        count = None
        for d in sorted((st.dir / "shards").iterdir()):
            if not (d / DONE_FILE).is_file():
                continue
            k, n = (int(x) for x in d.name.split("-of-"))
            if count not in (None, n):
                raise ValueError(f"{st.dir / 'shards'} mixes shard counts {count} and {n}")
            count = n
            done = json.loads((d / DONE_FILE).read_text())
            path = d / filename
            parts[k] = (done["result"]["tasks"], read_jsonl(path) if path.exists() else [])
        if count is None:
            raise ValueError(f"{st.dir / 'shards'}: no finished shard; run the shards first")
        records = merge_shards(parts, count, all_ids, task_field)
        from hpl_lightning.schema import write_jsonl

        write_jsonl(st.dir / filename, records)
        print(f"merged {count} shards: {len(records)} records of {len(all_ids)} tasks -> {st.dir / filename}")
        return {"tasks": all_ids, "merged_shards": count, "records": len(records)}

    def _segment(self, st: Stage, plan: Plan, shard: Shard | None) -> dict[str, Any]:
        from hpl_lightning import pipeline

        st.dir.mkdir(parents=True, exist_ok=True)
        reference = str(st.deps[1].dir / "model") if len(st.deps) > 1 else None  # uncertainty: pi_ref = SFT
        return pipeline.segment(str(plan.experts.dir / "experts.jsonl"), str(st.dir / "segmented.jsonl"),
                                st.params["segmenter"], st.params["options"], reference=reference,
                                dtype=self.dtype, device=self.device)

    def _pairs(self, st: Stage, plan: Plan, shard: Shard | None) -> dict[str, Any]:
        from hpl_lightning import pipeline

        st.dir.mkdir(parents=True, exist_ok=True)
        source, *explored = st.deps
        experts = source.dir / ("experts.jsonl" if source.kind == "experts" else "segmented.jsonl")
        merged = st.dir / "rollouts.jsonl"
        with open(merged, "w", encoding="utf-8") as f:
            for e in explored:
                f.write((e.dir / "rollouts.jsonl").read_text(encoding="utf-8"))
        result = pipeline.pairs(str(experts), str(merged), str(st.dir / "pairs.jsonl"), self.pair_filters,
                                st.params["levels"], st.params["max_negatives"], with_experts=True)
        merged.unlink()  # a copy of the explore stages' files
        return result

    def _train(self, st: Stage, plan: Plan, shard: Shard | None) -> dict[str, Any]:
        pairs, sft = st.deps
        options = self._run_options(st, str(sft.dir / "model"), str(pairs.dir / "pairs.jsonl"), st.params["seed"],
                                    st.params["options"])
        return {"checkpoint": str(self._train_process(st, options))}

    def _evaluate(self, st: Stage, plan: Plan, shard: Shard | None) -> dict[str, Any]:
        from hpl_lightning.evaluation import EPISODES_FILE, evaluate
        from hpl_lightning.policies import LocalPolicy, OpenAIPolicy

        (run,) = st.deps
        split, ev = st.params["split"], self.evaluation
        kwargs = self._env_kwargs(plan)
        if shard is None and (st.dir / "shards").is_dir():
            return self._merge(st, self.eval_task_ids(split, plan, kwargs), EPISODES_FILE, "id")
        ids = shard.select(self.eval_task_ids(split, plan, kwargs)) if shard is not None else None
        out = st.shard_dir(shard) if shard is not None else st.dir
        seed = st.params["sampling_seed"] or 0
        model = run.dir / "model"
        if run.kind == "train" and self.serving.base_url is not None and not model.exists():
            from hpl_lightning.export import export

            export(str(run.dir / "ckpt" / "last.ckpt"), str(model))
        served = self.serving.base_url is not None
        policy_path = model if run.kind == "sft" or served else run.dir / "ckpt" / "last.ckpt"
        with self._served(policy_path) as (name, base_url):
            if base_url is not None:
                policy = OpenAIPolicy(name, base_url=base_url, temperature=ev.temperature,
                                      max_tokens=ev.max_new_tokens, concurrency=self.serving.concurrency, seed=seed)
            else:
                policy = LocalPolicy(name, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
                                     batch_size=ev.batch_size, seed=seed, threads=ev.threads, **self._policy_kwargs())
            summary = evaluate(policy, self.benchmark.name, split, out, workers=ev.workers,
                               limit=ev.limit if ids is None else None, task_ids=ids, env_kwargs=kwargs,
                               progress=False)
        if not summary["complete"]:
            raise RuntimeError(f"evaluation {st.label}: {summary['failed']} episode(s) failed (environment crashed); "
                               "run again to retry them")
        return {"tasks": ids, "avg_reward": summary["avg_reward"], "success_rate": summary["success_rate"]}

    def eval_task_ids(self, split: str, plan: Plan, env_kwargs: dict[str, Any]) -> list[str]:
        """The evaluated tasks of ``split``, in split order (the first ``evaluation.limit``)."""
        if plan.splits_file is not None:
            from hpl_lightning.envs.sciworld import task_id

            protocol = json.loads(plan.splits_file.read_text())
            return [task_id(n, v) for n, v in protocol["splits"][split]][: self.evaluation.limit]
        from hpl_lightning.evaluation import BENCHMARKS

        env = BENCHMARKS[self.benchmark.name].make_env(**env_kwargs)
        try:
            return [t.id for t in env.tasks(split)][: self.evaluation.limit]
        finally:
            env.close()


# ------------------------------------------------------------------------------------------------ CLI
def main(args: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``python -m hpl_lightning.experiment -c EXPERIMENT.yaml [--dry_run] [--shard K/N --stage KIND]``."""
    import inspect

    from jsonargparse import ActionConfigFile, ActionYesNo

    from hpl_lightning.console import ShortErrorParser, one_line_errors

    parser = ShortErrorParser(prog="hpl-experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="an experiment YAML (configs/experiments/)")
    parser.add_class_arguments(Experiment, None, as_group=False)
    parser.add_argument("--dry_run", action=ActionYesNo, default=False, help="print the plan, run nothing")
    parser.add_argument("--shard", type=str | None, default=None, help="K/N: run shard K of N of --stage")
    parser.add_argument("--stage", type=Literal["explore", "evaluate"] | None, default=None,
                        help="with --shard: which kind of stage to shard (explore: both exploration kinds)")
    parser.add_argument("--stop_before", type=str | None, default=None,
                        help=f"stop at the first unfinished stage of this kind, one of {STAGE_KINDS}")
    parser.add_argument("--base_url", type=str | None, default=None, help="shortcut for --serving.base_url")
    cfg = parser.parse_args(args)
    if cfg.base_url is not None:
        cfg.serving.base_url = cfg.base_url
    init = parser.instantiate(cfg)
    with one_line_errors(ValueError):  # a config naming an unknown arm, segmenter, split or shard: one line
        experiment = Experiment(**{name: init[name] for name in inspect.signature(Experiment).parameters})
        shard = Shard.parse(cfg.shard) if cfg.shard is not None else None
    command = shlex.join(["hpl-experiment", *(sys.argv[1:] if args is None else args)])
    return experiment.run(cfg.dry_run, shard, cfg.stage, cfg.stop_before, command)


def console_main() -> None:
    """``hpl-experiment``: ``main`` without its return value (a console script would print it as an exit status)."""
    main()


if __name__ == "__main__":
    console_main()
