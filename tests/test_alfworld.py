"""ALFWorld: the pure parts everywhere; the real engine on a hand-made game when the alfworld package is installed;
the real games (split sizes, an episode) when ALFWorld's data is present (``alfworld-download``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpl_lightning.envs import initial_messages, observation_message, parse_action
from hpl_lightning.envs.alfworld import (
    GAMES_SUBDIR,
    NO_ACTION,
    AlfWorldEnv,
    clean_observation,
    data_dir,
    eto_feedback,
    game_command,
    game_files,
    split_dir,
    task_text,
    task_type,
)

APPLE, COUNTER, FRIDGE = "Apple_bar__plus_01_dot_00", "CounterTop_bar__plus_00_dot_50", "Fridge_bar__plus_01_dot_00"
TRIAL = "pick_and_place_simple-Apple-None-Fridge-1/trial_T0"
PROBLEM = f"""(define (problem plan_trial_T0)
(:domain alfred)
(:objects agent1 - agent {APPLE} - object {COUNTER} - receptacle {FRIDGE} - receptacle
 loc_bar_1 - location loc_bar_2 - location loc_bar_3 - location
 AppleType - otype CounterTopType - rtype FridgeType - rtype)
(:init (atLocation agent1 loc_bar_1)
 (receptacleAtLocation {COUNTER} loc_bar_2) (receptacleAtLocation {FRIDGE} loc_bar_3)
 (receptacleType {COUNTER} CounterTopType) (receptacleType {FRIDGE} FridgeType) (objectType {APPLE} AppleType)
 (inReceptacle {APPLE} {COUNTER}) (objectAtLocation {APPLE} loc_bar_2) (pickupable {APPLE}) (openable {FRIDGE})
 (canContain FridgeType AppleType) (canContain CounterTopType AppleType))
(:goal (exists (?r - receptacle) (and (inReceptacle {APPLE} ?r) (receptacleType ?r FridgeType))))
)"""


# --- pure parts ---------------------------------------------------------------------------------------------------
def test_observation_cleaning_drops_the_arrival_prefix_of_both_grammars() -> None:
    assert clean_observation("You arrive at loc 12. On the countertop 1, you see a apple 1.") == \
        "On the countertop 1, you see a apple 1."
    assert clean_observation("You arrive at fridge 1. The fridge 1 is closed.") == "The fridge 1 is closed."
    assert clean_observation("You pick up the apple 1 from the countertop 1.") == \
        "You pick up the apple 1 from the countertop 1."
    assert clean_observation("Nothing happens.") == "Nothing happens."
    assert clean_observation("You arrive at loc 3.") == "You arrive at loc 3."  # nothing after it: kept


def test_task_text_is_the_intro_without_banner() -> None:
    intro = ("-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room. Looking quickly around you, "
             "you see a cabinet 1, and a toilet 1.\n\nYour task is to: put a toiletpaper in toiletpaperhanger.")
    assert task_text(intro) == ("You are in the middle of a room. Looking quickly around you, you see a cabinet 1, "
                                "and a toilet 1.\nYour task is to: put a toiletpaper in toiletpaperhanger.")


def test_put_is_translated_only_where_the_game_speaks_move() -> None:
    old = ["go to fridge 1", "put apple 1 in/on fridge 1"]
    new = ["go to fridge 1", "move apple 1 to fridge 1"]
    assert game_command("put apple 1 in/on fridge 1", old) == "put apple 1 in/on fridge 1"
    assert game_command("put apple 1 in/on fridge 1", new) == "move apple 1 to fridge 1"
    assert game_command("put apple 1 in/on sofa 1", new) == "put apple 1 in/on sofa 1"  # not possible: as written
    assert game_command("go to fridge 1", new) == "go to fridge 1"
    assert eto_feedback("You move the apple 1 to the fridge 1.", True) == "You put the apple 1 in/on the fridge 1."
    assert eto_feedback("You move the apple 1 to the fridge 1.", False) == "You move the apple 1 to the fridge 1."


def test_action_parsing_and_splits() -> None:
    assert parse_action("Thought: the apple is here.\nAction: take apple 1 from countertop 1") == \
        "take apple 1 from countertop 1"
    assert parse_action("Thought: hmm") is None
    assert split_dir("dev") == "valid_seen" and split_dir("test") == "valid_unseen" and split_dir("train") == "train"
    with pytest.raises(ValueError, match="unknown ALFWorld split"):
        split_dir("valid")
    assert task_type(Path("x/valid_seen/pick_heat_then_place_in_recep-Egg-None-Fridge-13/trial_T1/game.tw-pddl")) == \
        "heat"


def test_data_dir_default_and_missing_data_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    assert data_dir() == Path.home() / ".cache" / "alfworld"
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="alfworld-download"):
        AlfWorldEnv()


# --- the real engine on a hand-made game -----------------------------------------------------------------------
def _make_data(root: Path, grammar_version: str) -> Path:
    """An ALFWorld data folder with one game, written with alfworld's own domain and grammar (0.4) or with the
    grammar reverted to what ETO's games (0.3) say."""
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

    grammar = Path(ALFRED_TWL2_PATH).read_text().replace("UNKNOWN GOAL", "put some apple in fridge")
    if grammar_version == "0.3":
        grammar = grammar.replace("move {o} to {r}", "put {o} in/on {r}").replace(
            "You move the {o.name} to the {r.name}.", "You put the {o.name} in/on the {r.name}.")
    game_dir = root / GAMES_SUBDIR / "valid_seen" / TRIAL
    game_dir.mkdir(parents=True)
    (game_dir / "traj_data.json").write_text(json.dumps({"task_type": "pick_and_place_simple"}))
    game = {"pddl_domain": Path(ALFRED_PDDL_PATH).read_text(), "grammar": grammar, "pddl_problem": PROBLEM,
            "solvable": True}
    (game_dir / "game.tw-pddl").write_text(json.dumps(game))
    unsolvable = root / GAMES_SUBDIR / "valid_seen" / "pick_and_place_simple-Apple-None-Fridge-1" / "trial_T9"
    unsolvable.mkdir()
    (unsolvable / "traj_data.json").write_text(json.dumps({"task_type": "pick_and_place_simple"}))
    (unsolvable / "game.tw-pddl").write_text(json.dumps({**game, "solvable": False}))
    return root


@pytest.mark.parametrize("grammar_version", ["0.3", "0.4"])
def test_episode_on_a_real_engine(tmp_path: Path, grammar_version: str) -> None:
    pytest.importorskip("alfworld", reason="the alfworld package is not installed (pip install -e '.[alfworld]')")
    root = _make_data(tmp_path, grammar_version)
    assert len(game_files(root, "dev")) == 1  # the unsolvable trial is left out, as AlfredTWEnv does
    with AlfWorldEnv(root, max_turns=8) as env:
        [task] = env.tasks("dev")
        assert task.id == f"alfworld/valid_seen/{TRIAL}" and task.meta["task_type"] == "put"
        assert task.description == ("You are in the middle of a room. Looking quickly around you, you see a "
                                    "countertop 1, and a fridge 1.\nYour task is to: put some apple in fridge.")
        assert env.task(task.id) == task
        assert env.reset(task) == ""
        assert initial_messages(env, task)[2]["content"] == task.description
        script = [
            ("go to countertop 1", "On the countertop 1, you see a apple 1."),
            ("", NO_ACTION),
            ("take apple from countertop 1", "Nothing happens."),
            ("take apple 1 from countertop 1", "You pick up the apple 1 from the countertop 1."),
            ("go to fridge 1", "The fridge 1 is closed."),
            ("open fridge 1", "You open the fridge 1. The fridge 1 is open. In it, you see nothing."),
        ]
        for action, observation in script:
            result = env.step(action)
            assert (result.observation, result.reward, result.done) == (observation, 0.0, False), action
        assert not env.step("take apple from countertop 1").info["valid"]
        result = env.step("put apple 1 in/on fridge 1")
        assert result.observation == "You put the apple 1 in/on the fridge 1."
        assert (result.reward, result.done, result.info["success"], result.info["turns"]) == (1.0, True, True, 8)
        assert observation_message(result.observation)["content"].startswith("Observation: You put")
        with pytest.raises(RuntimeError, match="no episode"):
            env.step("look")

        env.reset(task)  # a fresh game: the apple is back on the countertop
        assert env.step("go to countertop 1").observation == "On the countertop 1, you see a apple 1."
        for _ in range(7):
            result = env.step("look")
        assert (result.reward, result.done, result.info["truncated"]) == (0.0, True, True)

    with pytest.raises(ValueError, match="not an ALFWorld task id"):
        AlfWorldEnv(root).task("alfworld/valid_seen/nothing/here")


# --- the real games ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_data() -> Path:
    pytest.importorskip("alfworld", reason="the alfworld package is not installed (pip install -e '.[alfworld]')")
    root = data_dir()
    if not (root / GAMES_SUBDIR).is_dir():
        pytest.skip(f"ALFWORLD_DATA not found: {root / GAMES_SUBDIR} is missing (run `alfworld-download` on a "
                    f"machine with internet, or set ALFWORLD_DATA; see docs/environments.md)")
    return root


def test_real_split_sizes(real_data: Path) -> None:
    assert len(game_files(real_data, "dev")) == 140
    assert len(game_files(real_data, "test")) == 134
    if os.environ.get("ALFWORLD_FULL"):  # listing 3553 games reads every game file (slow)
        assert len(game_files(real_data, "train")) == 3553


def test_real_episode(real_data: Path) -> None:
    with AlfWorldEnv(real_data) as env:
        task = env.task("alfworld/" + game_files(real_data, "test")[0].parent.relative_to(
            real_data / GAMES_SUBDIR).as_posix())
        assert "Your task is to: " in task.description and task.description.startswith("You are in the middle")
        env.reset(task)
        result = env.step("look")
        assert result.observation and not result.done and result.reward == 0.0
        assert env.step("xyzzy").observation == "Nothing happens."
