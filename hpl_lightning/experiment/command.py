"""The ``hpl-experiment`` command: an experiment YAML in, the plan printed, the stages run (or one shard of them)."""

from __future__ import annotations

import inspect
import shlex
import sys
from typing import Any, Literal, Sequence

from jsonargparse import ActionConfigFile, ActionYesNo

from hpl_lightning.console import ShortErrorParser, one_line_errors
from hpl_lightning.experiment.kinds import KINDS
from hpl_lightning.experiment.runner import run
from hpl_lightning.experiment.settings import Experiment
from hpl_lightning.experiment.shards import Shard


def parser() -> ShortErrorParser:
    p = ShortErrorParser(prog="hpl-experiment", description="The HPL experiment runner: expert data in, a results "
                         "table with confidence intervals out, resumably.")
    p.add_argument("-c", "--config", action=ActionConfigFile, help="an experiment YAML (configs/experiments/)")
    p.add_class_arguments(Experiment, None, as_group=False)
    p.add_argument("--dry_run", action=ActionYesNo, default=False, help="print the plan, run nothing")
    p.add_argument("--shard", type=str | None, default=None, help="K/N: run shard K of N of --stage")
    p.add_argument("--stage", type=Literal["explore", "evaluate"] | None, default=None,
                   help="with --shard: which kind of stage to shard (explore: both exploration kinds)")
    p.add_argument("--stop_before", type=str | None, default=None,
                   help=f"stop at the first unfinished stage of this kind, one of {[k.name for k in KINDS]}")
    p.add_argument("--reuse_stale", action=ActionYesNo, default=False,
                   help="take finished stages made by other code as done (the report marks what they built)")
    p.add_argument("--base_url", type=str | None, default=None, help="shortcut for --serving.base_url")
    return p


def load(args: Sequence[str] | None = None) -> tuple[Experiment, Any]:
    """The checked ``Experiment`` of a command line, and the parsed command line (run options)."""
    p = parser()
    cfg = p.parse_args(args)
    if cfg.base_url is not None:
        cfg.serving.base_url = cfg.base_url
    init = p.instantiate(cfg)
    with one_line_errors():  # a config naming an unknown arm, segmenter, split or shard: one line
        return Experiment(**{name: init[name] for name in inspect.signature(Experiment).parameters}), cfg


def main(args: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``hpl-experiment -c EXPERIMENT.yaml [--dry_run] [--shard K/N --stage KIND] [--stop_before KIND]
    [--reuse_stale]``."""
    experiment, cfg = load(args)
    command = shlex.join(["hpl-experiment", *(sys.argv[1:] if args is None else args)])
    with one_line_errors():
        shard = Shard.parse(cfg.shard) if cfg.shard is not None else None
        return run(experiment, cfg.dry_run, shard, cfg.stage, cfg.stop_before, command, cfg.reuse_stale)


def console_main() -> None:
    """``hpl-experiment``: ``main`` without its return value (a console script would print it as an exit status)."""
    main()
