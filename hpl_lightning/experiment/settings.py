"""What an experiment config says: the option groups, the arms as recipes, and their checks.

Owns the configuration only: ``Experiment`` is what ``hpl-experiment -c EXP.yaml`` builds (its ``__init__`` is the
config schema jsonargparse reads) and what every other module of the runner receives. Nothing here plans or runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from hpl_lightning.errors import UsageError
from hpl_lightning.explore import ExploreConfig
from hpl_lightning.pairs import PairFilters
from hpl_lightning.policies import MAX_NEW_TOKENS
from hpl_lightning.prefix_cache import DEFAULT_ENGINE, Engine
from hpl_lightning.results import METRICS, Hypothesis

PREFERENCE_LEVELS = ("trajectory", "step", "group")
# The SFT stage is behaviour cloning on the experts: one curriculum phase, one pass; sft.options overrides (e.g.
# three epochs: data.schedule {unit: epochs, length: 3} with trainer.max_epochs 3).
SFT_DEFAULTS = {"data.curriculum.mode": "static", "trainer.max_epochs": 1}
# Evaluation settings that change how results are summarised or how fast, not the episodes: not part of the hash.
STATISTICS_ONLY = ("confidence", "baselines", "threads", "hypotheses")


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
    ``train.py`` options on top of ``training`` (null unsets one of training's, e.g. a precision meant for the
    preference runs); ``per_seed``: one SFT model per seed."""

    options: dict[str, Any] = field(default_factory=dict)
    per_seed: bool = False
    seed: int = 0  # the shared SFT model's seed (when not per_seed)


@dataclass
class Exploration:
    """``pipeline explore`` settings (the levels come from the arms)."""

    config: ExploreConfig = ExploreConfig()
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 1.0
    envs: int = 4
    batch_size: int = 16  # the recompute engine's largest batch
    threads: int | None = None
    seed: int = 0
    engine: Engine = DEFAULT_ENGINE  # a local model's (prefix_cache.Engine); samples differ between engines
    max_context: int | None = None  # a local model's window; None: training's data.max_length, else the model's


@dataclass
class Evaluation:
    """Evaluation of every checkpoint on every ``benchmark.eval_splits``; greedy unless ``temperature`` > 0."""

    workers: int = 4
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.0
    batch_size: int = 16  # the recompute engine's largest batch
    threads: int | None = None
    limit: int | None = None  # first N tasks of each split
    engine: Engine = DEFAULT_ENGINE  # a local model's (prefix_cache.Engine): the same greedy text, faster
    max_context: int | None = None  # a local model's window; None: training's data.max_length, else the model's
    confidence: float = 0.95
    baselines: list[str] = field(default_factory=lambda: ["sft", "eto"])  # paired comparisons: every arm vs these
    hypotheses: list[Hypothesis] = field(default_factory=list)  # pre-registered claims the report decides


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


class Experiment:
    """An experiment config, checked: arms resolved to recipes, segmenters and seeds validated before any stage
    runs. ``hpl_lightning.experiment.plan.build_plan`` turns it into stages, ``runner.run`` runs them."""

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
            raise UsageError(f"report_notes: no such file(s) {missing}")
        self.segmenters = dict(segmenters if segmenters is not None else {"semantic_embedding": {}})
        self.ablation_segmenter = ablation_segmenter
        self.arm_names = list(arms if arms is not None else ["sft", "eto", "ipr", "hpl-semantic_embedding"])
        self.custom_arms = dict(custom_arms or {})
        self.seeds = list(seeds if seeds is not None else [0])
        self._check_segmenters()
        self.recipes = {name: self._recipe(i, name) for i, name in enumerate(self.arm_names)}
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"seeds: expected distinct seeds, got {self.seeds}")
        if len(set(self.arm_names)) != len(self.arm_names):
            raise UsageError(f"arms: {self.arm_names} names an arm twice")
        self._check_hypotheses()

    def rollout_window(self, max_context: int | None) -> int | None:
        """The context window of exploration or evaluation: ``max_context``, else the training runs'
        ``data.max_length`` (options, then the base YAML), so that rollouts see the contexts training saw; None:
        the model's own window."""
        if max_context is not None:
            return max_context
        options = flatten(self.training.options)
        if "data.max_length" in options:
            return options["data.max_length"]
        base = yaml.safe_load(Path(self.training.config).read_text()) if self.training.config else None
        return ((base or {}).get("data") or {}).get("max_length")

    @property
    def publishes(self) -> bool:
        """Whether finished stages are also recorded in ``results_dir`` (a directory other than ``output_dir``)."""
        return self.results_dir.resolve() != self.root.resolve()

    def _check_segmenters(self) -> None:
        """Unknown segmenters or option names fail here, before any stage runs (building one may load a model)."""
        from hpl_lightning.segmentation import SEGMENTERS

        for name, options in self.segmenters.items():
            if name not in SEGMENTERS:
                raise UsageError(f"segmenters.{name}: unknown segmenter; expected one of {sorted(SEGMENTERS)}")
            unknown = set(options) - {f.name for f in fields(SEGMENTERS[name].config_class)}
            if unknown:
                raise UsageError(f"segmenters.{name}: unknown options {sorted(unknown)}")

    def _check_hypotheses(self) -> None:
        """A claim on an arm or split the experiment does not have fails here, not after the study ran."""
        for i, h in enumerate(self.evaluation.hypotheses):
            where = f"evaluation.hypotheses[{i}] ({h.name!r})"
            try:
                claims = h.parsed()
            except ValueError as e:
                raise UsageError(f"{where}: {e}") from None
            unknown = sorted({arm for a, b, _ in claims for arm in (a, b)} - set(self.arm_names))
            if unknown:
                raise UsageError(f"{where}: arms {unknown} are not in arms {self.arm_names}")
            if h.split not in self.benchmark.eval_splits:
                raise UsageError(f"{where}: split {h.split!r} is not in benchmark.eval_splits")
            if h.metric not in METRICS:
                raise UsageError(f"{where}: metric {h.metric!r}; expected one of {list(METRICS)}")

    def _recipe(self, i: int, name: str) -> Recipe:
        where = f"arms[{i}] ({name!r})"
        if name in self.custom_arms:
            arm = self.custom_arms[name]
            base = builtin_recipe(arm.base, list(self.segmenters), self.ablation_segmenter)
            if base is None:
                raise UsageError(f"custom_arms.{name}.base: unknown built-in arm {arm.base!r}")
            recipe = Recipe(tuple(arm.levels) if arm.levels is not None else base.levels,
                            arm.segmenter or base.segmenter, {**flatten(base.options), **flatten(arm.options)})
        else:
            recipe = builtin_recipe(name, list(self.segmenters), self.ablation_segmenter)
            if recipe is None:
                raise UsageError(
                    f"{where}: unknown arm; built-in: sft, eto, ipr, hpl, hpl-<segmenter> for segmenters "
                    f"{sorted(self.segmenters)}, hpl-no-group, hpl-static, hpl-length-only, hpl-difficulty-only; "
                    f"or a key of custom_arms {sorted(self.custom_arms)}")
        unknown = set(recipe.levels) - set(PREFERENCE_LEVELS)
        if unknown:
            raise UsageError(f"{where}: unknown levels {sorted(unknown)}")
        if "group" in recipe.levels and recipe.segmenter not in self.segmenters:
            raise UsageError(f"{where}: segmenter {recipe.segmenter!r} is not in segmenters "
                             f"{sorted(self.segmenters)}")
        return recipe
