"""ScienceWorld environment, pool and gold paths against the real simulator (a JVM per environment)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpl_lightning.envs.base import EnvironmentCrashed, Task, initial_messages
from hpl_lightning.schema import load_records

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="ScienceWorld's simulator needs a Java runtime")

from hpl_lightning.envs import sciworld  # noqa: E402
from hpl_lightning.envs.pool import EnvPool  # noqa: E402
from hpl_lightning.envs.sciworld import (  # noqa: E402
    DEFAULT_SPLITS,
    SciWorldEnv,
    Simulator,
    SciWorldSplits,
    gold,
    gold_experts,
    play_gold,
    task_id,
)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphaned JVM may wait for a reaper that containers lack)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], seconds: float = 120.0) -> bool:
    """An upper bound only: it returns as soon as the processes are gone."""
    deadline = time.monotonic() + seconds
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(running(p) for p in pids)


@pytest.fixture(scope="module")
def env():
    with SciWorldEnv() as e:
        yield e


def test_splits_follow_eto_protocol():
    protocol = SciWorldSplits.load(DEFAULT_SPLITS)
    assert protocol.simplification == "easy"
    assert {k: len(v) for k, v in protocol.splits.items()} == {"train": 1483, "dev": 194, "test": 211}
    assert len(protocol.max_steps) == 24


def test_task_and_prompt(env):
    task = env.task("find-animal", 193)
    assert task.id == "sciworld/find-animal/193"
    assert task.description.startswith("Your task is to find a(n) animal")
    assert task.meta["max_steps"] == 15
    first = env.reset(task)
    assert first.startswith("This room is called")
    messages = initial_messages(env, task, first)
    assert "Thought:" in messages[0]["content"] and "teleport to LOC" in messages[0]["content"]
    assert messages[2]["content"].startswith(task.description)


def test_invalid_actions_are_observations(env):
    env.reset(env.task("boil", 14))
    for action in ["fly to the moon", "", "focus on", "x" * 2000, "ünïcödé ☃"]:
        result = env.step(action)
        assert not result.done and result.reward == 0.0 and result.info["valid"] is False
        assert result.observation  # says why
    assert env.step("look around").info["valid"] is True


@pytest.mark.parametrize(
    "split,task_name,variation,fits",
    [("dev", "find-animal", 218, True), ("dev", "find-animal", 193, False), ("test", "chemistry-mix", 24, True)],
)
def test_gold_path_reward_and_step_budget(split, task_name, variation, fits):
    assert [task_name, variation] in json.loads(DEFAULT_SPLITS.read_text())["splits"][split]
    with SciWorldEnv(step_budget=False) as lifted:
        run = play_gold(lifted, (task_name, variation))
        assert run.success and run.reward == 1.0
        assert (run.first_success() <= run.task.meta["max_steps"]) is fits
    with SciWorldEnv(step_budget=True) as budgeted:
        run = play_gold(budgeted, (task_name, variation))
        assert run.success is fits
        assert len(run.steps) <= run.task.meta["max_steps"]
        assert run.steps[-1][1].info["truncated"] is (not fits)


def test_a_jvm_that_ignores_the_determinism_options_is_refused(monkeypatch):
    monkeypatch.setattr(sciworld, "DETERMINISTIC_JAVA_OPTS", ())  # as a JVM that ignored them would run
    with pytest.raises(EnvironmentCrashed, match="would not be deterministic"):
        Simulator()


def test_killed_simulator_is_restarted_and_episode_replayed():
    with SciWorldEnv(step_budget=False) as env:
        task = env.task("boil", 14)
        actions = env.gold_actions(task)
        env.reset(task)
        half = len(actions) // 2
        for action in actions[:half]:
            env.step(action)
        pid = env.simulator.pid
        os.kill(pid, signal.SIGKILL)
        for action in actions[half:]:
            result = env.step(action)
            if result.done:
                break
        assert env.simulator.pid != pid and env.restart_count == 1
        assert result.reward == 1.0 and result.info["success"]


def test_killed_simulator_without_restarts_fails_loudly():
    with SciWorldEnv(restarts=0) as env:
        task = env.task("find-animal", 218)
        env.reset(task)
        env.step("look around")
        os.kill(env.simulator.pid, signal.SIGKILL)
        with pytest.raises(EnvironmentCrashed, match="sciworld/find-animal/218.*JVM died"):
            env.step("look around")
        with pytest.raises(RuntimeError, match="no episode"):  # the lost episode cannot go on silently
            env.step("look around")
        assert env.reset(task).startswith("This room")  # a fresh JVM for the next episode


@pytest.mark.slow
def test_hung_simulator_times_out_and_is_restarted():
    with SciWorldEnv(step_budget=False, call_timeout=3.0) as env:
        task = env.task("find-animal", 218)
        actions = env.gold_actions(task)
        env.reset(task)
        env.step(actions[0])
        os.kill(env.simulator.pid, signal.SIGSTOP)  # alive but silent
        t0 = time.monotonic()
        results = [env.step(a) for a in actions[1:]]
        assert 3.0 <= time.monotonic() - t0 < 30.0
        assert env.restart_count == 1 and results[-1].reward == 1.0


def test_restore_replays_prefix_incrementally(env):
    task = env.task("boil", 14)
    actions = env.gold_actions(task)
    first = env.restore(task, actions[:20])
    assert first.info["replayed"] == 20 and first.info["turns"] == 20
    more = env.restore(task, actions[:25])
    assert more.info["replayed"] == 5 and more.info["turns"] == 25
    env.step("look around")  # the episode left the prefix: a full replay again
    again = env.restore(task, actions[:25])
    assert again.info["replayed"] == 25 and again.info["score"] == more.info["score"]


def test_pool_runs_episodes_and_stops_its_simulators():
    with EnvPool(lambda: SciWorldEnv(step_budget=False), 2) as pool:
        pids = [env.simulator.pid for env in pool.envs]
        assert all(running(p) for p in pids)
        variations = [("find-animal", 218), ("find-plant", 179), ("find-living-thing", 186)]
        results = dict(pool.map(play_gold, variations))
        assert sorted(results) == sorted(variations) and all(r.success for r in results.values())
        firsts = pool.each({slot: lambda e: e.reset(e.task("find-plant", 179)) for slot in range(2)})
        assert all(f.startswith("This room") for f in firsts.values())
    assert wait_gone(pids)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_simulators_die_with_their_python_process(tmp_path, sig):
    """Ctrl-C closes the pool; even SIGKILL (no cleanup at all) ends the JVMs through their stdin pipe."""
    script = textwrap.dedent(
        """
        import signal, time
        from hpl_lightning.envs.pool import EnvPool
        from hpl_lightning.envs.sciworld import SciWorldEnv
        # Ctrl-C as at a terminal: a suite started in the background (`cmd &`) hands its children SIGINT ignored,
        # and Python then never raises KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with EnvPool(SciWorldEnv, 2) as pool:
            print(*[e.simulator.pid for e in pool.envs], flush=True)
            time.sleep(600)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in child.stdout.readline().split()]
    assert len(pids) == 2 and all(running(p) for p in pids)
    child.send_signal(sig)
    child.wait(timeout=300)  # an upper bound only
    assert wait_gone(pids)


def test_gold_experts_resumable(tmp_path, capsys):
    out = tmp_path / "gold.jsonl"
    first = gold_experts("dev", str(out), limit=2, workers=1)
    assert first["written"] == 2 and not first["failed"]
    with open(out, "a") as f:
        f.write('{"id": "sciworld/cut-short')  # a crash while writing a line
    second = gold_experts("dev", str(out), limit=3, workers=1)
    assert second["skipped"] == 2 and second["written"] == 1
    records = [r for r, _ in load_records(out)]  # valid file, unique ids
    dev = json.loads(DEFAULT_SPLITS.read_text())["splits"]["dev"][:3]
    assert sorted(r.id for r in records) == sorted(f"sciworld/{t}/{v}" for t, v in dev)
    for r in records:
        assert r.reward == 1.0 and r.task == r.id and r.meta["score"] == 100
        assert r.messages[1] == {"role": "assistant", "content": "OK"}
        assert r.messages[3]["content"].startswith("Action: ") and r.messages[4]["content"].startswith("Observation: ")


def test_subgoal_reference_cuts_where_the_simulator_raised_the_score():
    """The reference of two gold paths (as segment-quality builds it) against the score increments of a replay of
    their actions on another simulator, read from the simulator itself."""
    from hpl_lightning.pairs import expert_actions
    from hpl_lightning.pipeline import gold_trajectories
    from hpl_lightning.segmentation import build_segmenter, subgoal_groups

    variations = [("find-living-thing", 186), ("lifespan-longest-lived-then-shortest-lived", 87)]
    trajectories, failed = gold_trajectories("dev", variations, str(DEFAULT_SPLITS), None, 1)
    assert not failed and [t.id for t in trajectories] == [f"sciworld/{n}/{v}" for n, v in variations]
    reference = build_segmenter("subgoal").segment_many(trajectories)
    with SciWorldEnv(step_budget=False) as env:
        for variation, t, cover in zip(variations, trajectories, reference):
            env.gold_actions(Task(task_id(*variation), ""))  # the loads play_gold makes, in its order: the
            env.reset(env.task(*variation))  # simulator's world depends on what it loaded before
            start = round(100 * env.simulator.call("getScore"))
            scores = []
            for action in expert_actions(t):
                env.step(action)
                scores.append(round(100 * env.simulator.call("getScore")))
            assert (t.meta["start_score"], t.meta["scores"]) == (start, scores)
            assert cover == subgoal_groups(scores, start)
    # the first load of a fresh simulator; its starting state gives 8 points (no cut after the first action)
    assert trajectories[0].meta["scores"] == [8, 17, 17, 67, 75, 75, 75, 75, 83, 100]
    assert reference[0] == [(0, 1), (2, 3), (4, 4), (5, 8), (9, 9)]


# (score, actions played, gold path length) of the first test variations, the same on every run (3 runs of the
# whole test split with 1 and 2 workers in two orders: docs/environments.md). Before the simulator was made
# deterministic, boil/22 scored 78 or 100 depending on what its JVM had run before.
GOLD_TEST_FIRST = {"sciworld/boil/21": (100, 69, 72), "sciworld/boil/22": (100, 160, 162),
                   "sciworld/boil/23": (100, 99, 102)}


def test_gold_command_output(capsys):
    """Two simulators, so one plays a second variation after another, and a shuffled order: the results must not
    depend on which JVM plays what, after what."""
    summary = gold("sciworld", "test", limit=3, workers=2, shuffle_seed=0)
    played = {tid: (r["score"], r["actions"], r["gold_length"]) for tid, r in summary["results"].items()}
    assert played == GOLD_TEST_FIRST
    assert capsys.readouterr().out.rstrip().splitlines()[-1] == "success: 3/3"
