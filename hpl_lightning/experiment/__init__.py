"""The HPL experiment runner: expert data in, a results table with confidence intervals out, resumably.

    hpl-experiment -c configs/experiments/sciworld-cpu-small.yaml --dry_run   # the plan only
    hpl-experiment -c configs/experiments/sciworld-cpu-small.yaml             # run / resume
    hpl-experiment -c EXP.yaml --shard 3/8 --stage explore                    # one SLURM task

Stages (each a directory ``<output_dir>/<kind>/<label>-<key>/``, keyed by the hash of everything that determines
its outputs, finished when its record ``done.json`` can be read): expert import -> SFT (``train.py fit`` on the
experts, exported as a model directory) -> segmentation per segmenter -> exploration of the trajectory and step
levels, and of the group level per segmenter, with the SFT policy -> pairs per (segmenter, levels) -> one preference
run per (arm, seed) -> evaluation of every final checkpoint on every split -> ``results.md``/``.json``/``.png``.
A re-run skips finished stages; a killed stage continues where it stopped. Changing a setting changes the keys of
the stages it feeds, and only those run again; changing the code a stage kind runs makes its finished stages stale
(their records keep the fingerprint of the code that made them), and they run again unless ``--reuse_stale``.

What a seed changes (``seeds``): the preference stage's ``seed_everything`` and ``data.seed`` (batch order within
each curriculum phase, dropout), and evaluation sampling when ``evaluation.temperature`` > 0 (greedy evaluation,
the default and the paper's, is the same for every seed). The SFT model, and with it the exploration data, the
segmentation and the pairs, is shared by all seeds unless ``sft.per_seed`` (then each seed trains its own SFT model
with that seed -- and its own init for config-only models -- and explores with it, sampling with that seed). Every
arm of a seed starts from the same SFT model and the same exploration data, so arms differ only in their objective.

One concept per module, lower layers first (none imports a later one):

- ``settings``: the config (``Experiment`` and its option groups) and the arms as recipes;
- ``records``: ``done.json`` written atomically and read back; fingerprints of outputs and input files;
- ``provenance``: what produced a stage (its kind's code, library versions, model weights, the commit);
- ``plan``: stages, their keys and dependencies, built from the settings (pure);
- ``shards``: ``--shard K/N`` and the merge of finished shards;
- ``publishing``: copying finished stages to ``results_dir`` and restoring them on a fresh checkout;
- ``processes``: training subprocesses, model servers, device memory;
- ``stages``: the body of every built-in stage kind;
- ``reuse``: a widened exploration starting from the rollouts of a finished one;
- ``kinds``: the registry of stage kinds (running order, body, cost model, sharding, what is published);
- ``status``: done / stale / needed / cost, the printed plan;
- ``runner``: the executor and the report;
- ``command``: ``hpl-experiment``.

How to add a stage kind: ``docs/experiment-runner.md``.
"""

from hpl_lightning.experiment.command import console_main, load, main
from hpl_lightning.experiment.kinds import KINDS, StageKind
from hpl_lightning.experiment.plan import Plan, Stage, build_plan
from hpl_lightning.experiment.runner import KILL_AFTER_ENV, run
from hpl_lightning.experiment.settings import (
    SFT,
    Arm,
    Benchmark,
    Cost,
    Evaluation,
    Experiment,
    Exploration,
    Recipe,
    Serving,
    Training,
    builtin_recipe,
    flatten,
    unflatten,
)
from hpl_lightning.experiment.shards import Shard, merge_shards

__all__ = ["KILL_AFTER_ENV", "KINDS", "SFT", "Arm", "Benchmark", "Cost", "Evaluation", "Experiment", "Exploration",
           "Plan", "Recipe", "Serving", "Shard", "Stage", "StageKind", "Training", "build_plan", "builtin_recipe",
           "console_main", "flatten", "load", "main", "merge_shards", "run", "unflatten"]
