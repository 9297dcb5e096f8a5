"""A widened exploration starts from the rollouts of a finished one (``experiment.reuse``): only when it selects
every plan that one did, with the same settings, dependencies and code; the runner records what it took."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hpl_lightning.envs.base import Task
from hpl_lightning.experiment import KINDS, Experiment, Shard, Stage, build_plan, run
from hpl_lightning.experiment.records import DONE_FILE, read_record
from hpl_lightning.experiment.reuse import selects_all_of
from hpl_lightning.experiment.settings import Exploration
from hpl_lightning.explore import ExploreConfig, plans
from hpl_lightning.schema import Trajectory


@pytest.mark.parametrize("old, new, covered", [
    ((2, 8, 8), (1, None, None), True),     # every step and group: covers any selection
    ((2, 8, 8), (1, 15, 8), True),          # old steps 0, 2, ..., 14 are the first 15 of stride 1
    ((2, 8, 8), (1, 14, 8), False),         # ...but not the first 14: step 14 would be missing
    ((2, 8, 8), (4, None, 8), False),       # stride 4 skips steps 2, 6, ...
    ((2, None, 8), (1, 30, 8), False),      # an uncapped selection is covered by no cap
    ((2, 8, 8), (2, 8, 4), False),          # fewer groups
    ((2, 8, None), (2, 8, 20), False),
    ((3, 4, 2), (3, 4, 2), True),
])
def test_a_selection_covers_another_when_it_holds_each_of_its_plans(old, new, covered) -> None:
    def config(stride: int, steps: int | None, groups: int | None) -> dict[str, Any]:
        return {"step_stride": stride, "max_steps_per_task": steps, "max_groups_per_task": groups}

    assert selects_all_of(config(*new), config(*old)) is covered
    # what it means, with the plans exploration itself selects, on trajectories of 1-40 actions
    holds = [_selected(config(*old), n) <= _selected(config(*new), n) for n in range(1, 41)]
    assert all(holds) if covered else not all(holds)


def _selected(config: dict[str, Any], actions: int) -> set[tuple[str, int]]:
    """(level, index) of every step and group plan ``explore.plans`` makes for an expert of ``actions`` one-action
    groups under selection ``config``."""
    messages = [{"role": "user", "content": "instruction"}, {"role": "assistant", "content": "OK"},
                {"role": "user", "content": "task"}]
    for i in range(actions):
        messages += [{"role": "assistant", "content": f"Thought: t{i}\nAction: a{i}"},
                     {"role": "user", "content": f"Observation: o{i}"}]
    expert = Trajectory("x/1", "x", messages, 1.0, {"groups": [[i, i] for i in range(actions)]})
    found = plans([expert], lambda t: Task("x/1", "task"), ExploreConfig(levels=("step", "group"), **config))
    return {(jobs[0].level, jobs[0].index) for jobs in (next(plan) for plan in found)}


class Explorer:
    """Fake stage bodies: an exploration stage notes the rollouts it started from and appends its own."""

    def __init__(self) -> None:
        self.found: dict[str, list[str]] = {}

    def __call__(self, exp: Experiment, plan: Any, st: Stage, shard: Shard | None) -> dict[str, Any]:
        st.dir.mkdir(parents=True, exist_ok=True)
        if st.kind in ("explore", "explore_group"):
            path = st.dir / "rollouts.jsonl"
            self.found[st.kind] = path.read_text().splitlines() if path.exists() else []
            with path.open("a") as f:
                f.write(json.dumps({"key": f"{st.kind}|{st.params['config']['step_stride']}"}) + "\n")
        if st.kind == "evaluate":
            episode = {"id": "sql/1", "group": "easy", "reward": 0.5, "success": 0.0, "turns": 1}
            (st.dir / "episodes.jsonl").write_text(json.dumps(episode) + "\n")
        return {}


def _exp(root: Path, temperature: float = 1.0, **config: Any) -> Experiment:
    from hpl_lightning.experiment import Benchmark

    return Experiment(str(root), benchmark=Benchmark(name="intercode_sql", expert_source="intercode", expert_limit=3,
                                                     eval_splits=["dev"]),
                      segmenters={"fixed_k": {}}, arms=["sft", "hpl-fixed_k"], seeds=[0],
                      exploration=Exploration(config=ExploreConfig(**config), temperature=temperature))


def _explore_stages(exp: Experiment) -> dict[str, Stage]:
    return {s.kind: s for s in build_plan(exp, KINDS).stages if s.kind in ("explore", "explore_group")}


def test_a_widened_exploration_starts_from_the_finished_one_and_says_so(tmp_path: Path, capsys) -> None:
    body = Explorer()
    kinds = tuple(replace(k, run=body) for k in KINDS)
    narrow = _exp(tmp_path, step_stride=2, max_steps_per_task=8, max_groups_per_task=8)
    run(narrow, kinds=kinds)
    assert body.found == {"explore": [], "explore_group": []}
    old = _explore_stages(narrow)

    wide = _exp(tmp_path, step_stride=1, max_steps_per_task=None, max_groups_per_task=None)
    run(wide, kinds=kinds)
    new = _explore_stages(wide)
    for kind in ("explore", "explore_group"):
        assert new[kind].key != old[kind].key
        assert body.found[kind] == [json.dumps({"key": f"{kind}|2"})]  # the narrow stage's rollouts, then its own
        assert read_record(new[kind].dir / DONE_FILE)["result"]["reused"] == {
            "from": str(old[kind].dir.relative_to(narrow.root)), "rollouts": 1}
    assert "starts from the 1 rollouts of explore/" in capsys.readouterr().out

    # another temperature (a setting that shapes each rollout), or a narrower selection: from nothing
    for other in (_exp(tmp_path, 0.7, step_stride=1, max_steps_per_task=None, max_groups_per_task=None),
                  _exp(tmp_path, step_stride=2, max_steps_per_task=4, max_groups_per_task=8)):
        run(other, kinds=kinds)
        assert body.found == {"explore": [], "explore_group": []}
        assert all("reused" not in read_record(s.dir / DONE_FILE)["result"] for s in _explore_stages(other).values())


def test_rollouts_made_by_other_code_are_not_reused(tmp_path: Path) -> None:
    body = Explorer()
    kinds = tuple(replace(k, run=body) for k in KINDS)
    narrow = _exp(tmp_path, step_stride=2)
    run(narrow, kinds=kinds)
    for st in _explore_stages(narrow).values():
        record = read_record(st.dir / DONE_FILE)
        record["provenance"]["fingerprint"] = "0" * 16
        (st.dir / DONE_FILE).write_text(json.dumps(record))
    run(_exp(tmp_path, step_stride=1), kinds=kinds)
    assert body.found == {"explore": [], "explore_group": []}
