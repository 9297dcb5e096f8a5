"""ALFWorld (github.com/alfworld/alfworld) on its TextWorld backend, behind the common interface, as ETO/IPR run it.

Protocol (ETO's ``eval_agent/tasks/alfworld.py`` and ``envs/alfworld_env.py``):
- games: ``$ALFWORLD_DATA/json_2.1.1/<split>/<task>/<trial>/game.tw-pddl`` (``alfworld-download``), kept when
  AlfredTWEnv keeps them (the six task types, no ``movable``/``Sliced`` trials, ``solvable``): train 3553 games,
  dev = valid_seen (140), test = valid_unseen (134);
- task statement: the game's intro without its banner, i.e. the room description, a newline, and
  ``Your task is to: ...``; observations: the game's feedback, without the ``You arrive at ...`` prefix of
  ``go to`` (ETO's ``process_ob``); an action the game does not know yields ``Nothing happens.``;
- reward: 1 when the game is won (TextWorld's ``won``), else 0; the episode ends when won or after 30 turns.

Two generations of game files exist and they speak different command grammars: those ETO used (alfworld 0.3,
``put X in/on Y``, ``You arrive at loc 12.``) and those ``alfworld-download`` fetches since 0.4 (``move X to Y``,
``You arrive at countertop 1.``). Agents trained on ETO/IPR/HPL data speak the first, so on a 0.4 game ``put X
in/on Y`` is sent as ``move X to Y`` and the answer is worded back (``You put the X in/on the Y.``); both generations
then give the same episodes.

The game runs in this process (TextWorld's PDDL engine); an exception from it means the game state is unknown and
is raised as ``EnvironmentCrashed``. ``alfworld`` is an optional dependency: ``pip install -e '.[alfworld]'``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hpl_lightning.envs.base import Environment, EnvironmentCrashed, StepResult, Task
from hpl_lightning.errors import UsageError

BENCHMARK = "alfworld"
MAX_TURNS = 30
GAMES_SUBDIR = "json_2.1.1"
# Our split names -> ALFWorld's folders (AlfredTWEnv: train / eval_in_distribution / eval_out_of_distribution).
SPLITS = {"train": "train", "dev": "valid_seen", "test": "valid_unseen",
          "valid_seen": "valid_seen", "valid_unseen": "valid_unseen"}
# ALFWorld's six task types (AlfredTWEnv.TASK_TYPES) -> the sub-task names ETO reports results by.
TASK_TYPES = {
    "pick_and_place_simple": "put",
    "look_at_obj_in_light": "examine",
    "pick_clean_then_place_in_recep": "clean",
    "pick_heat_then_place_in_recep": "heat",
    "pick_cool_then_place_in_recep": "cool",
    "pick_two_obj_and_place": "puttwo",
}
NOTHING_HAPPENS = "Nothing happens."
NO_ACTION = "Invalid action: no action given. Write one after 'Action:'."
_ARRIVE = re.compile(r"You arrive at [^.]*\. (?=\S)")
_PUT = re.compile(r"put (.+) in/on (.+)")
_MOVED = re.compile(r"You move the (.+) to the (.+)\.")

INSTRUCTION = """\
You are an agent in a household. You will be told what the room looks like and what your task is; then you act \
one step at a time, and after each action you see what happened.

At every turn, think briefly and then give exactly one action, in this form:
Thought: <your reasoning>
Action: <one action>

Actions (OBJ is an object and RECEP a receptacle such as a cabinet, a fridge or a countertop, named with their \
number as the observations name them, e.g. "apple 1", "countertop 2"):
- go to RECEP: walk to a receptacle and see what is on or in it
- open RECEP / close RECEP: open or close a receptacle such as a drawer, a cabinet, a fridge or a microwave
- take OBJ from RECEP: pick an object up; you can hold one object at a time
- put OBJ in/on RECEP: place the object you hold in or on a receptacle (write "in/on" as is)
- clean OBJ with RECEP: wash an object in a sink basin
- heat OBJ with RECEP: heat an object with a microwave
- cool OBJ with RECEP: cool an object with a fridge
- use OBJ: switch a device such as a desk lamp on or off
- examine OBJ / examine RECEP: look at something closely
- inventory: list what you are holding
- look: describe where you are

If the answer is "Nothing happens.", the action was not possible: try something else."""


def data_dir(path: str | Path | None = None) -> Path:
    """Where ALFWorld's data lives: ``path``, else ``$ALFWORLD_DATA``, else alfworld's default ``~/.cache/alfworld``."""
    return Path(path or os.environ.get("ALFWORLD_DATA") or Path.home() / ".cache" / "alfworld").expanduser()


def split_dir(split: str) -> str:
    if split not in SPLITS:
        raise UsageError(f"unknown ALFWorld split {split!r}; expected one of {sorted(SPLITS)}")
    return SPLITS[split]


def game_files(root: Path, split: str) -> list[Path]:
    """The split's playable games, filtered as AlfredTWEnv does, in a stable (sorted) order."""
    base = root / GAMES_SUBDIR / split_dir(split)
    games = []
    for traj in sorted(base.glob("*/*/traj_data.json")):
        game = traj.with_name("game.tw-pddl")
        if "movable" in str(traj.parent) or "Sliced" in str(traj.parent) or not game.is_file():
            continue
        if json.loads(traj.read_text())["task_type"] not in TASK_TYPES:
            continue
        if json.loads(game.read_text()).get("solvable"):
            games.append(game)
    return games


def task_id(root: Path, game: Path) -> str:
    """``alfworld/<split folder>/<task folder>/<trial folder>``: stable across machines."""
    return f"{BENCHMARK}/{game.parent.relative_to(root / GAMES_SUBDIR).as_posix()}"


def task_type(game: Path) -> str:
    """The sub-task name (put, clean, heat, cool, examine, puttwo) from the game's folder name."""
    folder = game.parent.parent.name
    return next((name for prefix, name in TASK_TYPES.items() if folder.startswith(prefix)), "unknown")


def task_text(intro: str) -> str:
    """The game's intro without its ``-= Welcome to TextWorld, ALFRED! =-`` banner (ETO's task statement)."""
    return "\n".join(intro.split("\n\n")[1:])


def clean_observation(feedback: str) -> str:
    """Drops the ``You arrive at ...`` prefix that ``go to`` feedback starts with, as ETO does."""
    return _ARRIVE.sub("", feedback, count=1) if feedback.startswith("You arrive at ") else feedback


def game_command(action: str, admissible: list[str]) -> str:
    """The command to send: ``put X in/on Y`` becomes ``move X to Y`` where the game speaks alfworld 0.4's grammar."""
    match = _PUT.fullmatch(action)
    if match and action not in admissible:
        moved = f"move {match[1]} to {match[2]}"
        if moved in admissible:
            return moved
    return action


def eto_feedback(feedback: str, translated: bool) -> str:
    """Words a translated ``move`` answer as the ``put`` answer of ETO's games."""
    match = _MOVED.fullmatch(feedback) if translated else None
    return f"You put the {match[1]} in/on the {match[2]}." if match else feedback


def _textworld() -> tuple[Any, Callable[[], list[Any]]]:
    """Imports the game engine on first use: ``alfworld`` is an optional dependency."""
    try:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    except ImportError as e:
        raise ImportError(
            f"ALFWorld needs the 'alfworld' package ({e}); install it with: pip install -e '.[alfworld]'"
        ) from e
    return textworld, lambda: [AlfredDemangler(shuffle=False), AlfredInfos]  # a wrapper instance wraps one game


@dataclass
class _Episode:
    game: Any
    admissible: list[str]
    turns: int = 0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class AlfWorldEnv(Environment):
    """ALFWorld text games, one episode at a time, in this process.

    ``data``: the ALFWorld data folder (default ``$ALFWORLD_DATA``, else ``~/.cache/alfworld``); it must hold
    ``json_2.1.1`` with the ``game.tw-pddl`` files. Task descriptions are the games' intros, so listing a split
    loads each of its games once (about a second a game).
    """

    benchmark = BENCHMARK
    instruction = INSTRUCTION

    def __init__(self, data: str | Path | None = None, max_turns: int = MAX_TURNS):
        self.root = data_dir(data)
        if not (self.root / GAMES_SUBDIR).is_dir():
            raise FileNotFoundError(
                f"ALFWorld data not found: {self.root / GAMES_SUBDIR} is missing; run `alfworld-download` "
                f"(or set ALFWORLD_DATA to the folder holding {GAMES_SUBDIR}), see docs/environments.md"
            )
        self.max_turns = max_turns
        self._textworld, self._wrappers = _textworld()  # wrappers: a factory, called per game
        self._episode: _Episode | None = None

    def tasks(self, split: str) -> list[Task]:
        return [self._task(game) for game in game_files(self.root, split)]

    def task(self, tid: str) -> Task:
        """The task with id ``alfworld/<split folder>/<task folder>/<trial folder>``."""
        prefix = f"{BENCHMARK}/"
        game = self.root / GAMES_SUBDIR / tid.removeprefix(prefix) / "game.tw-pddl"
        if not tid.startswith(prefix) or not game.is_file():
            raise ValueError(f"not an ALFWorld task id or no such game under {self.root}: {tid!r}")
        return self._task(game)

    def _task(self, game: Path) -> Task:
        env = self._start(game)
        try:
            intro = self._call(lambda: env.reset().feedback, game)
        finally:
            env.close()
        meta = {"game_file": str(game), "task_type": task_type(game), "split": game.parents[2].name}
        return Task(task_id(self.root, game), task_text(intro), meta)

    def _start(self, game: Path) -> Any:
        infos = self._textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        return self._call(lambda: self._textworld.start(str(game), infos, wrappers=self._wrappers()), game)

    @staticmethod
    def _call(fn: Callable[[], Any], game: Path) -> Any:
        try:
            return fn()
        except Exception as e:  # the engine runs in-process: any failure leaves the game state unknown
            raise EnvironmentCrashed(f"ALFWorld game {game}: {type(e).__name__}: {e}") from e

    def reset(self, task: Task) -> str:
        """Starts the game; returns '' because the task description already holds the intro."""
        self.close()
        game = Path(task.meta["game_file"])
        env = self._start(game)
        state = self._call(env.reset, game)
        self._episode = _Episode(env, list(state["admissible_commands"]), info={"game_file": str(game)})
        return ""

    def step(self, action: str) -> StepResult:
        ep = self._episode
        if ep is None or ep.done:
            raise RuntimeError("no episode in progress: call reset(task) first (or again after done)")
        action = action.strip()
        won, valid = False, False
        if action:
            command = game_command(action, ep.admissible)
            state, _, _ = self._call(lambda: ep.game.step(command), Path(ep.info["game_file"]))
            observation = eto_feedback(clean_observation(state.feedback), command != action)
            won, valid = bool(state["won"]), state.feedback != NOTHING_HAPPENS
            ep.admissible = list(state["admissible_commands"])
        else:
            observation = NO_ACTION
        ep.turns += 1
        truncated = ep.turns >= self.max_turns and not won
        ep.done = won or truncated
        info = {**ep.info, "won": won, "success": won, "valid": valid, "turns": ep.turns, "truncated": truncated}
        return StepResult(observation, 1.0 if won else 0.0, ep.done, info)

    def close(self) -> None:
        if self._episode is not None:
            self._episode.game.close()
            self._episode = None
