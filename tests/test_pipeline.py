"""The data pipeline (`python -m hpl_lightning.pipeline`): pair filters on hand-made rollouts, then end to end on
InterCode-SQL (real server) and ScienceWorld (real simulator) with the tiny policy, through `train.py fit`, and crash
safety of `explore` under SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import pytest

from hpl_lightning.envs.base import Environment, StepResult, Task
from hpl_lightning.envs.pool import EnvPool
from hpl_lightning.explore import ExploreConfig, Explorer, count_plans, plans, read_rollouts
from hpl_lightning.pipeline import main
from hpl_lightning.pairs import PairFilters, Rollout, accepted_tries, build_pairs, rollout_key
from hpl_lightning.policies import Conversation, Policy
from hpl_lightning.schema import Trajectory, load_records

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RECORDINGS = DATA / "intercode_sql" / "gpt-3.5_react_10_turns.json"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------------ pure pair logic
def _expert(groups: list[list[int]] | None = None, reward: float = 1.0) -> Trajectory:
    messages = [{"role": "user", "content": "instruction"}, {"role": "assistant", "content": "OK"},
                {"role": "user", "content": "task"}]
    for i in range(4):
        messages += [{"role": "assistant", "content": f"Thought: t{i}\nAction: a{i}"},
                     {"role": "user", "content": f"Observation: o{i}"}]
    return Trajectory("x/1", "x", messages, reward, {"groups": groups or [[0, 1], [2, 3]]})


def _roll(level: str, index: int, role: str, sample: int, reward: float, actions: list[str] | None = None,
          parent: int | None = None) -> Rollout:
    actions = actions if actions is not None else [f"b{sample}"]
    messages = []
    for a in actions:
        messages += [{"role": "assistant", "content": f"Action: {a}"}, {"role": "user", "content": "Observation: z"}]
    return Rollout(rollout_key("x/1", level, index, role, sample, parent), "x/1", level, index, role, sample,
                   messages, list(actions), reward, True, parent)


def test_trajectory_pairs_choose_the_better_episode_and_drop_ties() -> None:
    expert = _expert()
    pairs, report = build_pairs([expert], [_roll("trajectory", 0, "agent", 0, 0.0)])
    (pair,) = [p for p in pairs if p.level == "trajectory"]
    assert pair.chosen == expert.messages[3:] and pair.chosen_reward == 1.0 and pair.rejected_reward == 0.0
    assert pair.prompt == expert.messages[:3]
    _, report = build_pairs([expert], [_roll("trajectory", 0, "agent", 0, 0.995)])
    assert report.dropped["trajectory"]["reward_margin"] == 1 and report.kept["trajectory"] == 0


def test_pairs_command_writes_the_expert_trajectories_by_default(tmp_path: Path) -> None:
    """The paper's L_BC (Eq. 1) needs the expert trajectories: `pipeline pairs` writes them with the pairs."""
    from dataclasses import asdict

    from hpl_lightning.schema import to_json

    experts, rollouts = tmp_path / "experts.jsonl", tmp_path / "rollouts.jsonl"
    experts.write_text(json.dumps(to_json(_expert())) + "\n")
    rollouts.write_text(json.dumps(asdict(_roll("trajectory", 0, "agent", 0, 0.0))) + "\n")
    for extra, expected in (([], {"x/1"}), (["--with_experts", "false"], set())):
        out = tmp_path / f"pairs{len(extra)}.jsonl"
        main(["pairs", "--experts", str(experts), "--rollouts", str(rollouts), "--output", str(out), *extra])
        records = [r for r, _ in load_records(out)]
        assert {r.id for r in records if isinstance(r, Trajectory)} == expected
        assert sum(not isinstance(r, Trajectory) for r in records) == 1  # the trajectory pair


def test_step_pairs_filter_on_final_reward_and_mc_value() -> None:
    expert = _expert()

    def candidate(t: int, agent: list[float], experts: list[float], action: str = "b") -> list[Rollout]:
        return ([_roll("step", t, "try", 0, 0.0, [action])]
                + [_roll("step", t, "proposal_mc", k, r, parent=0) for k, r in enumerate(agent)]
                + [_roll("step", t, "expert_mc", k, r) for k, r in enumerate(experts)])

    rollouts = (
        candidate(1, [0.0, 0.0], [1.0, 0.5])  # agent worse in both: kept, expert chosen
        + candidate(2, [1.0], [1.0])  # final rewards equal: dropped by the reward margin
        + candidate(3, [0.0, 1.0], [1.0, 0.5])  # MC values too close (0.75 vs 0.5): dropped by the value margin
    )
    pairs, report = build_pairs([expert], rollouts, PairFilters(step_both_directions=False), levels=["step"])
    (pair,) = pairs
    assert pair.prompt == expert.messages[:5] and pair.chosen == expert.messages[5:]
    assert pair.rejected == rollouts[0].messages + rollouts[1].messages  # the alternative, then completion 0
    assert (pair.chosen_reward, pair.rejected_reward) == (0.75, 0.0) and pair.meta["chosen"] == "expert"
    assert dict(report.dropped["step"]) == {"reward_margin": 1, "value_margin": 1}
    loose, _ = build_pairs([expert], rollouts, PairFilters(step_value_margin=0.2), levels=["step"])
    assert len(loose) == 2


def test_step_pairs_choose_the_agent_when_it_wins_both_margins() -> None:
    """The release keeps step pairs in both directions: the agent's continuation is chosen when its final reward
    and MC value beat the expert's by the margins (here the expert trajectory failed, reward 0)."""
    expert = _expert(reward=0.0)
    rollouts = [_roll("step", 1, "try", 0, 0.0, ["b"]), _roll("step", 1, "proposal_mc", 0, 1.0, parent=0),
                _roll("step", 1, "proposal_mc", 1, 1.0, parent=0), _roll("step", 1, "expert_mc", 0, 0.0)]
    (pair,), report = build_pairs([expert], rollouts, levels=["step"])
    assert pair.meta["chosen"] == "agent" and pair.chosen[0]["content"] == "Action: b"
    assert pair.rejected == expert.messages[5:] and (pair.chosen_reward, pair.rejected_reward) == (1.0, 0.0)
    assert report.agent_chosen["step"] == report.kept["step"] == 1 and "0 expert-chosen, 1 agent-chosen" in \
        report.summary()
    one_way, report = build_pairs([expert], rollouts, PairFilters(step_both_directions=False), levels=["step"])
    assert one_way == [] and dict(report.dropped["step"]) == {"reward_margin": 1}


def test_step_alternative_equal_to_the_experts_is_never_a_pair() -> None:
    """A try whose command equals the expert's (whitespace aside, whatever its thought) is skipped; all tries equal
    drop the candidate."""
    expert = _expert()
    same = Rollout(rollout_key("x/1", "step", 1, "try", 0), "x/1", "step", 1, "try", 0,
                   [{"role": "assistant", "content": "Thought: other\nAction:  a1 "}], [" a1 "], 0.0, False)
    rollouts = [same, _roll("step", 1, "expert_mc", 0, 1.0), _roll("step", 1, "proposal_mc", 0, 0.0, parent=0)]
    pairs, report = build_pairs([expert], rollouts, levels=["step"])
    assert pairs == [] and dict(report.dropped["step"]) == {"no_distinct_alternative": 1}
    assert report.equal_to_expert["step"] == 1


def test_negatives_are_distinct_full_length_and_at_most_three() -> None:
    expert_sig = ("a0", "a1")
    tries = [_roll("group", 0, "try", k, 0.0, acts) for k, acts in enumerate(
        [["a0", "a1"], ["c", "d"], ["c", "d"], ["e"], ["f", "g"], ["h", "i"], ["j", "k"]])]
    assert [t.sample for t in accepted_tries(expert_sig, tries, 2)] == [1, 4, 5]
    assert [t.sample for t in accepted_tries(expert_sig, list(reversed(tries)), 2, 2)] == [1, 4]


def test_group_pairs_use_mc_values_and_paper_filters() -> None:
    expert = _expert([[0, 1], [2, 3]])
    rollouts = [
        _roll("group", 0, "expert_mc", 0, 1.0), _roll("group", 0, "expert_mc", 1, 0.8),
        _roll("group", 0, "try", 0, 0.0, ["p", "q"]), _roll("group", 0, "try", 1, 0.0, ["r", "s"]),
        _roll("group", 0, "negative_mc", 0, 0.0, parent=0), _roll("group", 0, "negative_mc", 1, 0.2, parent=0),
        _roll("group", 0, "negative_mc", 0, 0.8, parent=1),  # gap 0.1: margin
        _roll("group", 1, "expert_mc", 0, 0.6), _roll("group", 1, "try", 0, 0.0, ["u", "v"]),
        _roll("group", 1, "negative_mc", 0, 0.0, parent=0),  # r(G_w) = 0.6 < 0.8: min_chosen
    ]
    pairs, report = build_pairs([expert], rollouts, levels=["group"])
    (pair,) = pairs
    assert pair.group_length == 2 and pair.difficulty == pytest.approx(0.8)
    assert pair.prompt == expert.messages[:3]
    assert pair.chosen == expert.messages[3:6]  # two actions, the observation between, none after the last
    assert [m["role"] for m in pair.rejected] == ["assistant", "user", "assistant"]
    assert dict(report.dropped["group"]) == {"margin": 1, "min_chosen": 1}
    assert "group" in report.summary() and "1 margin" in report.summary()


class RaisingEnv(Environment):
    """Steps of the hand-made expert (a0..a3, a3 ends with reward 1); the action ``boom`` raises ``MemoryError``, as
    an agent's action that exhausts the process would."""

    benchmark, max_turns, instruction = "x", 10, "instruction"

    def tasks(self, split: str) -> list[Task]:
        return [Task("x/1", "task")]

    def reset(self, task: Task) -> str:
        return ""

    def step(self, action: str) -> StepResult:
        if action == "boom":
            raise MemoryError("the agent's action took all memory")
        return StepResult("o", float(action == "a3"), action == "a3")


class BoomFirstPolicy(Policy):
    """Answers ``boom`` right after the task statement and ``a3`` anywhere else."""

    def generate(self, conversations: list[Conversation], keys: Sequence[str] | None = None) -> list[str]:
        return ["Action: boom" if c[-1]["content"] == "task" else "Action: a3" for c in conversations]

    def describe(self) -> dict[str, Any]:
        return {"type": "boom-first"}


def test_a_rollout_that_raises_is_recorded_as_failed_and_exploration_goes_on(tmp_path: Path) -> None:
    """The trajectory rollout and the step-0 proposal raise MemoryError on every attempt: both are written with the
    reason and reward null, the other rollouts finish, pairs skip the failed ones, and a re-run tries them again."""
    expert, path = _expert(), tmp_path / "rollouts.jsonl"
    config = ExploreConfig(levels=("trajectory", "step"), mc_samples=1, max_tries=2, retries=1)

    def explore() -> dict[str, Rollout]:
        with EnvPool(RaisingEnv, 1) as pool:
            explorer = Explorer(pool, {False: BoomFirstPolicy(), True: BoomFirstPolicy()}, path, config, False)
            explorer.run(plans([expert], lambda t: Task("x/1", "task"), config), count_plans([expert], config))
        return read_rollouts(path)

    rollouts = explore()
    failed = {k: r for k, r in rollouts.items() if r.error is not None}
    assert set(failed) == {"x/1|trajectory|0|agent|0", "x/1|step|0|try|0"}  # a failed try is not resampled
    for r in failed.values():
        assert r.reward is None and r.error.startswith("environment crashed 2 time(s), last: MemoryError at ")
        assert r.error.endswith(": the agent's action took all memory")
    finished = [r for r in rollouts.values() if r.error is None]
    # expert_mc x4; t=1, 2: a try and its completion; t=3: both tries equal the expert's a3
    assert len(finished) == 10 and all(r.reward == 1.0 for r in finished)
    pairs, report = build_pairs([expert], list(rollouts.values()))
    assert report.candidates["trajectory"] == 0 and report.candidates["step"] == 4
    lines = len(path.read_text().splitlines())
    explore()
    assert len(path.read_text().splitlines()) == lines + 2  # only the failed ones ran again


class ProgressEnv(Environment):
    """The hand-made expert's world: the reward is the share of a0..a3 done in order; a3 after the others ends it."""

    benchmark, max_turns, instruction = "x", 10, "instruction"

    def tasks(self, split: str) -> list[Task]:
        return [Task("x/1", "task")]

    def reset(self, task: Task) -> str:
        self.done = 0
        return ""

    def step(self, action: str) -> StepResult:
        self.done += action == f"a{self.done}"
        return StepResult("o", self.done / 4, self.done == 4)


class CopyFirstPolicy(Policy):
    """A step's tries 0 and 1 copy the expert's action (another thought, extra spaces), every other turn is ``zz``."""

    def generate(self, conversations: list[Conversation], keys: Sequence[str] | None = None) -> list[str]:
        out = []
        for key in keys:
            _, level, t, role, sample = key.split("/turn")[0].split("|")[:5]
            copy = level == "step" and role == "try" and int(sample) < 2
            out.append(f"Thought: mine\nAction:  a{t} " if copy else "Thought: x\nAction: zz")
        return out

    def describe(self) -> dict[str, Any]:
        return {"type": "copy-first"}


class BudgetEnv(ProgressEnv):
    """ProgressEnv whose episode ends at its turn budget, as the benchmarks' environments do."""

    def reset(self, task: Task) -> str:
        self.turns = 0
        return super().reset(task)

    def step(self, action: str) -> StepResult:
        self.turns += 1
        result = super().step(action)
        return StepResult(result.observation, result.reward, result.done or self.turns >= self.max_turns)


def _explore_steps(path: Path, config: ExploreConfig, env: type[ProgressEnv] = ProgressEnv,
                   task: Task = Task("x/1", "task")) -> dict[str, Rollout]:
    expert = _expert()
    with EnvPool(env, 2) as pool:
        explorer = Explorer(pool, {False: CopyFirstPolicy(), True: CopyFirstPolicy()}, path, config, False)
        explorer.run(plans([expert], lambda t: task, config), count_plans([expert], config))
    return read_rollouts(path)


def test_the_trajectory_level_plays_whole_episodes_whatever_the_rollout_cap(tmp_path: Path) -> None:
    """ETO's failed trajectory is a whole episode: cut after max_actions it would score below the expert because it
    stopped (the cap is for Monte-Carlo completions). It gets the task's evaluation budget where the task names one
    (exploration lifts sciworld's own budget to 500 turns for long expert prefixes), else the environment's;
    ``trajectory_to_end: false`` restores the cut."""
    config = ExploreConfig(levels=("trajectory",), max_actions=3)
    whole = _explore_steps(tmp_path / "whole.jsonl", config, BudgetEnv)
    budgeted = _explore_steps(tmp_path / "budgeted.jsonl", config, BudgetEnv, Task("x/1", "task", {"max_steps": 6}))
    cut = _explore_steps(tmp_path / "cut.jsonl", replace(config, trajectory_to_end=False), BudgetEnv)
    assert [len(r.actions) for r in whole.values()] == [ProgressEnv.max_turns]  # zz never ends it: the budget
    assert [len(r.actions) for r in budgeted.values()] == [6]
    assert [len(r.actions) for r in cut.values()] == [3]


def test_step_alternative_equal_to_the_experts_is_resampled(tmp_path: Path) -> None:
    config = ExploreConfig(levels=("step",), mc_samples=2, max_tries=5, max_actions=3)  # zz never ends it
    rollouts = _explore_steps(tmp_path / "rollouts.jsonl", config)
    for t in range(4):
        tries = sorted((r for r in rollouts.values() if r.index == t and r.role == "try"), key=lambda r: r.sample)
        assert [r.actions for r in tries] == [[f"a{t}"], [f"a{t}"], ["zz"]]  # resampled until it differs
        completions = [r for r in rollouts.values() if r.index == t and r.role == "proposal_mc"]
        assert len(completions) == 2 and {r.parent for r in completions} == {2}
    pairs, report = build_pairs([_expert()], list(rollouts.values()), PairFilters(step_value_margin=0.1),
                                levels=["step"])
    assert report.equal_to_expert["step"] == 8 and "8 alternatives (resampled) equal to the expert's" in \
        report.summary()
    assert pairs and all(p.rejected[0]["content"] == "Thought: x\nAction: zz" for p in pairs)


def test_step_sides_get_the_same_actions_after_the_branch_point(tmp_path: Path) -> None:
    """With max_actions = 2 every Monte-Carlo rollout of either side has its branch action (replayed) and 2 more;
    the expert's final reward is the one reached after as many actions (expert_cut), and its side is cut there."""
    config = ExploreConfig(levels=("step",), mc_samples=2, max_tries=5, max_actions=2)
    rollouts = list(_explore_steps(tmp_path / "rollouts.jsonl", config).values())
    mc = [r for r in rollouts if r.role == "proposal_mc" or (r.role == "expert_mc" and r.index < 3)]
    assert mc and all(len(r.actions) == 2 for r in mc)  # (expert_mc at t=3 replays a3, which ends the episode)
    cuts = {r.index: r for r in rollouts if r.role == "expert_cut"}
    assert set(cuts) == {0} and cuts[0].sample == 3 and cuts[0].reward == 0.75  # a0..a2: 3 of 4 done
    pairs, _ = build_pairs([_expert()], rollouts, PairFilters(step_value_margin=0.1), levels=["step"])
    by_t = {p.meta["t"]: p for p in pairs}
    assert by_t[0].meta["chosen_final_reward"] == 0.75 and by_t[0].chosen == _expert().messages[3:9]
    assert by_t[1].meta["chosen_final_reward"] == 1.0 and by_t[1].chosen == _expert().messages[5:]  # to the end
    assert all(sum(m["role"] == "assistant" for m in p.rejected) == 3 for p in pairs)


class ScoringEnv(RaisingEnv):
    """Reports a score after each action, as ScienceWorld does: the expert's actions a0..a3 raise it by 25 each."""

    def reset(self, task: Task) -> str:
        self.score = 0
        return ""

    def step(self, action: str) -> StepResult:
        self.score += 25 * action.startswith("a")
        return StepResult("o", self.score / 100, action == "a3", {"score": self.score})


def test_rollouts_record_the_score_after_each_action_where_the_env_gives_one(tmp_path: Path) -> None:
    expert, config = _expert(), ExploreConfig(levels=("step",), mc_samples=1, max_steps_per_task=3)
    for env, path in ((ScoringEnv, tmp_path / "scored.jsonl"), (RaisingEnv, tmp_path / "unscored.jsonl")):
        with EnvPool(env, 1) as pool:
            explorer = Explorer(pool, {False: BoomFirstPolicy(), True: BoomFirstPolicy()}, path, config, False)
            explorer.run(plans([expert], lambda t: Task("x/1", "task"), config), count_plans([expert], config))
    scored, unscored = read_rollouts(tmp_path / "scored.jsonl"), read_rollouts(tmp_path / "unscored.jsonl")
    # one score per agent action (none for a completion whose replayed branch already ended the episode), each the
    # one before plus 25 for an a* action (boom raises nothing)
    assert scored and all(len(r.meta.get("scores", [])) == len(r.actions) for r in scored.values())
    for r in scored.values():
        steps = zip(r.meta.get("scores", []), r.meta.get("scores", [])[1:], r.actions[1:])
        assert all(after - before == 25 * action.startswith("a") for before, after, action in steps)
    # after the expert's a0 (25), the agent's try a3 at t = 1 raises it to 50
    (try_at_1,) = [r for r in scored.values() if r.index == 1 and r.role == "try"]
    assert try_at_1.actions == ["a3"] and try_at_1.meta == {"scores": [50]}
    assert unscored and all(r.meta == {} for r in unscored.values())


def test_pool_map_yields_in_input_order_whatever_finishes_first() -> None:
    """Item 0 finishes last (it waits until item 3 is done, on the other environment): the results still come in
    input order, so records written from them do not depend on the pool size or the machine's load."""
    last_done = threading.Event()

    def play(env: RaisingEnv, item: int) -> int:
        if item == 0:
            assert last_done.wait(timeout=60)  # an upper bound only
        elif item == 3:
            last_done.set()
        return item * 10

    with EnvPool(RaisingEnv, 2) as pool:
        assert list(pool.map(play, [0, 1, 2, 3])) == [(0, 0), (1, 10), (2, 20), (3, 30)]


def test_rollouts_are_read_in_key_order(tmp_path: Path) -> None:
    """The rollout file is in finish order; pairs are built in key order, the same for any number of envs."""
    path = tmp_path / "rollouts.jsonl"
    finished = [_roll("step", 1, "proposal", 0, 1.0), _roll("trajectory", 0, "agent", 0, 0.0),
                _roll("step", 0, "expert_mc", 1, 1.0)]
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in finished))
    assert list(read_rollouts(path)) == sorted(r.key for r in finished)


# ------------------------------------------------------------------------------------------------ helpers
def pipeline(*args: str) -> Any:
    """In process (the subprocess start-up of torch and transformers would dominate these small runs)."""
    return main(list(args))


def fit(tmp: Path, *train: Path, max_length: int = 512) -> None:
    args = [sys.executable, "train.py", "fit", f"--data.train_path={json.dumps([str(p) for p in train])}",
            "--model.policy=hpl-tiny", "--trainer.max_steps=2", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}",
            f"--checkpoint.dirpath={tmp / 'ckpt'}", f"--data.max_length={max_length}", "--data.batch_size=2"]
    done = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp / "ckpt" / "last.ckpt").is_file()


def keys(path: Path) -> list[str]:
    """Keys of the finished rollouts: whole lines only (a kill may have cut the last one)."""
    return [json.loads(line)["key"] for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def pair_levels(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record, _ in load_records(path):
        level = getattr(record, "level", "expert")
        counts[level] = counts.get(level, 0) + 1
    return counts


SQL_EXPLORE = ["--benchmark", "intercode_sql", "--exploration.mc_samples", "2", "--max_new_tokens", "4",
               "--envs", "2", "--threads", "1", "--progress", "false"]


# ------------------------------------------------------------------------------------------------ InterCode-SQL
@pytest.fixture(scope="module")
def sql_experts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sql")
    pipeline("import", "--input", str(RECORDINGS), "--output", str(tmp / "experts.jsonl"), "--limit", "2")
    pipeline("segment", "--input", str(tmp / "experts.jsonl"), "--output", str(tmp / "segmented.jsonl"),
             "--segmenter", "fixed_k")
    return tmp / "segmented.jsonl"


@pytest.fixture(scope="module")
def sql_rollouts(mysql_url: str, sql_experts: Path) -> tuple[Path, dict[str, Any]]:
    """One uninterrupted exploration: the end-to-end test's input and the crash test's reference."""
    path = sql_experts.parent / "rollouts.jsonl"
    summary = pipeline("explore", "--experts", str(sql_experts), "--output", str(path), "--db_url", mysql_url,
                       *SQL_EXPLORE)
    return path, summary


@pytest.mark.mysql
@pytest.mark.slow
def test_intercode_sql_end_to_end(sql_experts: Path, sql_rollouts: tuple[Path, dict[str, Any]],
                                  tmp_path: Path) -> None:
    experts = [r for r, _ in load_records(sql_experts)]
    assert len(experts) == 2 and all(r.reward == 1.0 and r.meta["groups"] for r in experts)  # type: ignore
    rollouts, summary = sql_rollouts
    ks = keys(rollouts)
    assert len(ks) == len(set(ks)) == summary["rollouts"] and summary["rollouts_per_second"] > 0
    assert {"generate", "step", "restore"} <= set(summary["seconds"])
    assert {"agent", "try", "proposal_mc", "expert_mc", "negative_mc"} == set(summary["per_role"])
    result = pipeline("pairs", "--experts", str(sql_experts), "--rollouts", str(rollouts),
                      "--output", str(tmp_path / "pairs.jsonl"), "--with_experts", "true")
    counts = pair_levels(tmp_path / "pairs.jsonl")
    assert counts == {**result["pairs"], "expert": 2}
    assert all(counts.get(level, 0) >= 1 for level in ("trajectory", "step", "group")), result
    fit(tmp_path, tmp_path / "pairs.jsonl")


@pytest.mark.mysql
@pytest.mark.slow
def test_killed_explore_resumes_to_the_same_rollouts(mysql_url: str, sql_experts: Path,
                                                     sql_rollouts: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    reference, killed = sql_rollouts[0], tmp_path / "killed.jsonl"
    args = ["explore", "--experts", str(sql_experts), "--output", str(killed), "--db_url", mysql_url, *SQL_EXPLORE]
    # SIGKILLed right after its 20th rollout is flushed, with the 21st line begun: deterministic, whatever the load
    proc = subprocess.run([sys.executable, "-m", "tests.killers", "hpl_lightning.explore", "20",
                           "hpl_lightning.pipeline", *args], cwd=REPO, env=ENV, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = keys(killed)
    assert len(partial) == 20 < len(keys(reference))
    assert not killed.read_text().endswith("\n")  # the cut line is there until the resumed run removes it
    pipeline(*args)
    assert f"{len(partial)} rollouts already in" in capsys.readouterr().out
    resumed = keys(killed)
    assert len(resumed) == len(set(resumed))  # nothing ran twice
    assert resumed[: len(partial)] == partial and set(resumed) == set(keys(reference))  # nothing lost


def test_uncertainty_segmentation_computes_entropies_with_the_reference(tmp_path: Path) -> None:
    pipeline("import", "--input", str(RECORDINGS), "--output", str(tmp_path / "e.jsonl"), "--limit", "3")
    pipeline("segment", "--input", str(tmp_path / "e.jsonl"), "--output", str(tmp_path / "s.jsonl"),
             "--segmenter", "uncertainty", "--reference", "hpl-tiny")
    for record, _ in load_records(tmp_path / "s.jsonl"):
        n = record.n_actions - 1  # type: ignore[union-attr]  # the "OK" acknowledgement is not an action
        assert len(record.meta["action_entropies"]) == n and all(h > 0 for h in record.meta["action_entropies"])
        assert record.meta["groups"][0][0] == 0 and record.meta["groups"][-1][1] == n - 1
    stats = pipeline("stats", "--input", str(tmp_path / "s.jsonl"), "--segmenters", '["fixed_k", "uncertainty"]')
    assert stats["fixed_k"]["trajectories"] == stats["uncertainty"]["trajectories"] == 3


def test_uncertainty_segmentation_needs_an_explicit_reference_and_every_action_in_context(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No silent random-init reference (a one-line error); an action cut off by max_length is an error naming the
    record."""
    from hpl_lightning.pipeline import action_entropies
    from hpl_lightning.policies import LocalPolicy

    pipeline("import", "--input", str(RECORDINGS), "--output", str(tmp_path / "e.jsonl"), "--limit", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        pipeline("segment", "--input", str(tmp_path / "e.jsonl"), "--output", str(tmp_path / "s.jsonl"),
                 "--segmenter", "uncertainty")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: segmenter uncertainty:") and "pass --reference" in err
    (expert, _), = load_records(tmp_path / "e.jsonl")
    with pytest.raises(ValueError, match=f"trajectory '{expert.id}': action 0 does not fit in max_length=64 tokens"):
        action_entropies(LocalPolicy("hpl-tiny"), expert, max_length=64)


# ------------------------------------------------------------------------------------------------ ScienceWorld
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="ScienceWorld's simulator needs a Java runtime")
def test_sciworld_end_to_end(tmp_path: Path) -> None:
    splits = json.loads((DATA / "sciworld" / "splits.json").read_text())
    splits["splits"]["train"] = [["lifespan-longest-lived", 2], ["lifespan-shortest-lived", 40]]  # 3 actions each
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    gold = tmp_path / "gold.jsonl"
    pipeline("import", "--source", "sciworld_gold", "--output", str(gold), "--splits", str(tmp_path / "splits.json"))
    assert sorted(r.id for r, _ in load_records(gold)) == ["sciworld/lifespan-longest-lived/2",
                                                            "sciworld/lifespan-shortest-lived/40"]
    fixed, semantic = tmp_path / "fixed_k.jsonl", tmp_path / "semantic.jsonl"
    pipeline("segment", "--input", str(gold), "--output", str(fixed), "--segmenter", "fixed_k",
             "--options", '{"group_size": 2}')
    assert all(r.meta["groups"] == [[0, 1], [2, 2]] for r, _ in load_records(fixed))  # type: ignore[union-attr]
    pipeline("segment", "--input", str(gold), "--output", str(semantic), "--segmenter", "semantic_embedding")
    stats = pipeline("stats", "--input", str(gold), "--segmenters", '["fixed_k", "semantic_embedding"]')
    assert stats["fixed_k"]["groups"] == 2 and stats["semantic_embedding"]["trajectories"] == 2
    rollouts, train = tmp_path / "rollouts.jsonl", tmp_path / "pairs.jsonl"
    summary = pipeline("explore", "--experts", str(semantic), "--output", str(rollouts), "--benchmark", "sciworld",
                       "--exploration.mc_samples", "2", "--exploration.max_negatives", "2",
                       "--exploration.max_actions", "2", "--exploration.step_stride", "2", "--max_new_tokens", "4",
                       "--envs", "2", "--threads", "1", "--progress", "false")
    assert summary["per_role"]["expert_mc"]["restore"] > 0  # every rollout replays its expert prefix
    result = pipeline("pairs", "--experts", str(semantic), "--rollouts", str(rollouts), "--output", str(train))
    assert all(result["pairs"].get(level, 0) >= 1 for level in ("trajectory", "step", "group")), result
    fit(tmp_path, train, max_length=2048)  # ScienceWorld's instruction and observations are long
    done = subprocess.run(
        [sys.executable, "evaluate.py", "run", "--benchmark", "sciworld", "--split", "dev", "--limit", "2",
         "--policy", str(tmp_path / "ckpt" / "last.ckpt"), "--max_new_tokens", "4", "--workers", "2",
         "--threads", "1", "--output_dir", str(tmp_path / "eval")],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n"] == 2 and summary["complete"]
