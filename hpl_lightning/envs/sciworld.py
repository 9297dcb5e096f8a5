"""ScienceWorld (github.com/allenai/ScienceWorld) behind the common environment interface, as ETO evaluated it.

Protocol (``../shared/data/sciworld/splits.json``): simplification "easy", ETO's train/dev/test variations, a step
budget per task type; reward = best score seen in the episode / 100, success = score 100.

The simulator is a JVM reached through py4j. It can die or hang, and it cannot snapshot its state, so the environment
remembers the actions of the current episode: when a call fails or exceeds ``call_timeout``, the JVM is killed and
restarted, the episode is replayed (checking that every answer is the same as before) and the call is retried. Only
when that fails ``restarts`` times does the caller get ``EnvironmentCrashed``, naming the reason — never a reward
computed on a wrong state. JVMs are started with ``die_on_exit``: they exit when this Python process does, even on
SIGKILL; ``close`` (also at interpreter exit) stops them earlier.

Determinism: an episode and a gold path depend only on the task, the variation and the actions — not on what the
JVM ran before, on timing, or on which worker plays them — so a replayed prefix gives byte-identical observations.
ScienceWorld seeds its random generator from the variation on every load; two things it does not reset are fixed
from here (see docs/environments.md, ScienceWorld):
- a world's objects live in hash sets of objects without their own ``hashCode``, and a set's iteration order (objects
  listed, ambiguity lists, the order heat flows between objects, the gold agent's choices) follows identity hashes,
  which come from per-thread generators advanced by whatever the JVM did before. ``DETERMINISTIC_JAVA_OPTS`` give
  every object the same identity hash, so a set iterates in insertion order;
- the gold agent caches its room-search order per start room for the JVM's life, drawn from the random state of the
  first variation that needed it: ``Simulator.reset_gold_search`` puts every room's order in one fixed state before
  each gold path.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import random
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from py4j.java_gateway import GatewayParameters, JavaGateway, launch_gateway
from py4j.protocol import Py4JError, Py4JJavaError
from scienceworld.constants import BASEPATH, JAR_PATH
from tqdm.auto import tqdm

from hpl_lightning.envs.base import (
    Environment,
    EnvironmentCrashed,
    StepResult,
    Task,
    initial_messages,
    observation_message,
)
from hpl_lightning.envs.pool import EnvPool
from hpl_lightning.schema import Trajectory, append_jsonl, to_json

BENCHMARK = "sciworld"
DEFAULT_SPLITS = Path(__file__).resolve().parents[3] / "shared" / "data" / "sciworld" / "splits.json"
LIFTED_MAX_TURNS = 500  # "no budget": well above the longest gold path (162 actions on test)
DEFAULT_JAVA_OPTS = ("-Xmx1g", "-XX:+UseSerialGC")  # the JVM default heap grows past 3 GB RSS per simulator
# always added (last, so java_opts cannot undo them): identity hashes all equal, hash sets iterate in insertion order
DETERMINISTIC_JAVA_OPTS = ("-XX:+UnlockExperimentalVMOptions", "-XX:hashCode=2")
NO_MATCH = "No known action matches that input."
GOLD_SEARCH_WORLD = ("boil", 0)  # the world the gold agent's fixed room-search orders are computed in (any would do)
X = TypeVar("X")

INSTRUCTION = """\
You are an agent doing science experiments in a simulated household world. The rooms are the kitchen, foundry, \
workshop, bathroom, outside, living room, bedroom, greenhouse, art studio and hallway. Doors and containers are \
already open, and you can teleport to any room in a single action. Look for the objects the task needs, then carry \
the task out.

At every turn, think briefly and then give exactly one action, in this form:
Thought: <your reasoning>
Action: <one action>

Actions (OBJ is an object and LOC a room, named as the observations name them):
- look around: describe the room you are in
- look at OBJ: describe an object; look in OBJ: list what a container holds
- read OBJ: read a book, a note or a sign
- inventory: list what you are carrying
- task: repeat the task description
- teleport to LOC: go straight to a room; go to LOC: walk to an adjacent room
- pick up OBJ: take an object into your inventory; put down OBJ: drop it here
- move OBJ to OBJ: put an object in or on another one
- pour OBJ in OBJ: pour a liquid into a container; dunk OBJ in OBJ: dip an object into a liquid
- mix OBJ: mix the contents of a container
- open OBJ / close OBJ: open or close a container or a door
- activate OBJ / deactivate OBJ: switch a device (stove, freezer, lamp...) on or off
- connect OBJ to OBJ / disconnect OBJ: wire electrical components together or apart
- use OBJ on OBJ: apply a tool to something, e.g. use thermometer on water
- eat OBJ, flush OBJ
- focus on OBJ: declare the object the task is about; do this only when the task asks for it, because focusing \
on the wrong object fails the task
- wait: let 10 time steps pass; wait1: let a single time step pass

If an action could mean several objects, the world answers with a numbered list; reply with just the number of the \
one you mean as your next action."""


@dataclass(frozen=True)
class SciWorldSplits:
    """ETO's protocol as stored in ``splits.json``."""

    simplification: str
    max_steps: dict[str, int]
    splits: dict[str, list[tuple[str, int]]]

    @classmethod
    def load(cls, path: str | Path = DEFAULT_SPLITS) -> "SciWorldSplits":
        if not Path(path).is_file():
            raise FileNotFoundError(f"ScienceWorld splits not found at {path} (see shared/data/README.md, sciworld/)")
        raw = json.loads(Path(path).read_text())
        splits = {name: [(t, int(v)) for t, v in pairs] for name, pairs in raw["splits"].items()}
        return cls(raw["simplification"], {k: int(v) for k, v in raw["max_steps"].items()}, splits)

    def variations(self, split: str, limit: int | None = None) -> list[tuple[str, int]]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.splits)}")
        return self.splits[split][:limit]


def task_id(task_name: str, variation: int) -> str:
    return f"{BENCHMARK}/{task_name}/{variation}"


def parse_task_id(tid: str) -> tuple[str, int]:
    """``sciworld/<task>/<variation>`` -> (task name, variation)."""
    parts = tid.split("/")
    if len(parts) != 3 or parts[0] != BENCHMARK or not parts[2].isdigit():
        raise ValueError(f"not a ScienceWorld task id: {tid!r} (expected '{BENCHMARK}/<task>/<variation>')")
    return parts[1], int(parts[2])


class Simulator:
    """One ScienceWorld JVM. Any failed or timed-out call kills it, so a stuck JVM never lingers; ``start`` again."""

    def __init__(self, call_timeout: float = 60.0, java_opts: Sequence[str] = DEFAULT_JAVA_OPTS):
        self.call_timeout, self.java_opts = call_timeout, tuple(java_opts)
        self._lock = threading.Lock()  # start/kill may race when the pool closes during a restart
        self._closed = False
        self._proc: Any = None
        self._gateway: JavaGateway | None = None
        self._server: Any = None
        self._search_cache: Any = None  # PathFinder.precomputedExhaustivePaths: room -> search order
        self._search_orders: Any = None  # its fixed state (a copy), computed on the first gold path in this JVM
        self.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise EnvironmentCrashed("simulator closed")
            self._kill_locked()
            try:
                port, self._proc = launch_gateway(
                    classpath=JAR_PATH, cwd=BASEPATH, javaopts=[*self.java_opts, *DETERMINISTIC_JAVA_OPTS],
                    die_on_exit=True, create_new_process_group=True, return_proc=True,  # Ctrl-C reaches Python
                )
                self._gateway = JavaGateway(
                    gateway_parameters=GatewayParameters(
                        port=port, auto_field=True, read_timeout=self.call_timeout, enable_memory_management=False
                    ),
                    java_process=self._proc,
                )
                self._server = self._gateway.jvm.scienceworld.runtime.pythonapi.PythonInterface()
                self._search_cache = self._gateway.jvm.scienceworld.goldagent.PathFinder.precomputedExhaustivePaths()
                lang = self._gateway.jvm.java.lang
                hashes = {lang.System.identityHashCode(lang.Object()) for _ in range(2)}
            except (Py4JError, OSError, ValueError) as e:
                self._kill_locked()
                raise EnvironmentCrashed(f"could not start the ScienceWorld JVM: {e}") from e
            if len(hashes) != 1:
                self._kill_locked()
                raise EnvironmentCrashed(f"this JVM ignores {' '.join(DETERMINISTIC_JAVA_OPTS)} (is it not HotSpot?): "
                                         "ScienceWorld would not be deterministic; use an OpenJDK (HotSpot) runtime")
            atexit.register(self.kill)

    def call(self, method: str, *args: Any) -> Any:
        """Calls the simulator's ``PythonInterface.<method>``; on any failure kills the JVM and raises."""
        return self._guarded(method, lambda server: getattr(server, method)(*args))

    def reset_gold_search(self, world: tuple[str, int, str]) -> None:
        """Puts the gold agent's room-search orders (``PathFinder.precomputedExhaustivePaths``) in one fixed state.

        ScienceWorld computes a start room's order when a gold path first searches from it, shuffled by that
        variation's random state, and keeps it for the JVM's life: a gold path depended on the gold paths generated
        before. The first call in a JVM computes every room's order from seed 0 in ``world`` (task, variation,
        simplification; all variations share the house's rooms and doors) and keeps a copy, seconds once; every call
        restores that copy, so no gold path computes or keeps one of its own.
        """
        cache = self._search_cache

        def restore(server: Any) -> None:
            if self._search_orders is None:
                self._search_orders = self._fixed_search_orders(server, cache, world)
            cache.clear()
            getattr(cache, "$plus$plus$eq")(self._search_orders)

        self._guarded("reset_gold_search", restore)

    def _fixed_search_orders(self, server: Any, cache: Any, world: tuple[str, int, str]) -> Any:
        jvm = self._gateway.jvm
        path_finder = jvm.scienceworld.goldagent.PathFinder
        rng = getattr(getattr(jvm.scala.util, "Random$"), "MODULE$")  # the generator ScienceWorld draws from
        server.load(*world, False)
        loaded = server.agentInterface().get()
        rooms = path_finder.buildLocationGraph(loaded.universe()).keySet()
        cache.clear()
        for room in sorted(jvm.scala.collection.JavaConverters.setAsJavaSet(rooms)):
            rng.setSeed(0)
            path_finder.createActionSequenceSearchPatternPrecomputed(loaded.universe(), loaded.agent(), room)
        return cache.clone()

    def _guarded(self, what: str, fn: Callable[[Any], X]) -> X:
        """``fn(PythonInterface)``; on any failure kills the JVM and raises ``EnvironmentCrashed``."""
        server, proc = self._server, self._proc  # close() from another thread may clear them meanwhile
        if server is None:
            raise EnvironmentCrashed("simulator not running")
        try:
            return fn(server)
        except Py4JError as e:
            if isinstance(e, Py4JJavaError):
                reason = f"Java error in {what}: {str(e.java_exception)[:300]}"
            else:
                try:  # a killed JVM's socket closes a moment before the process is gone
                    reason = f"JVM died (exit code {proc.wait(timeout=2)})"
                except subprocess.TimeoutExpired:
                    reason = f"no answer to {what} within {self.call_timeout:g} s ({e})"
            self.kill()
            raise EnvironmentCrashed(reason) from e

    def memory_bytes(self) -> int | None:
        """Resident memory of the JVM (Linux /proc), to size pools."""
        if not self.alive:
            return None
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return None

    def kill(self) -> None:
        with self._lock:
            self._kill_locked()

    def _kill_locked(self) -> None:
        atexit.unregister(self.kill)
        if self._gateway is not None:
            self._gateway.close(keep_callback_server=True)  # there is none; avoids py4j's deprecated path
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()  # stdout belongs to py4j's reader thread, which ends at EOF
        self._proc = self._gateway = self._server = self._search_cache = self._search_orders = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._kill_locked()


@dataclass
class _Episode:
    """What is needed to rebuild the simulator's state after a restart: the actions sent and what they gave."""

    task: Task
    max_turns: int
    last: StepResult
    actions: list[str] = field(default_factory=list)
    scores: list[int] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    best: int = 0
    turns: int = 0

    @property
    def done(self) -> bool:
        return self.last.done


class SciWorldEnv(Environment):
    """ScienceWorld, one episode at a time, on its own JVM.

    ``step_budget``: True applies ETO's per-task-type budget (``max_steps``) as ``max_turns``; False lifts it to
    ``LIFTED_MAX_TURNS`` (for gold paths and rollouts from long expert prefixes). The episode ends (``done``) when
    the task is completed, failed (negative score) or the budget is used up (``info['truncated']``).
    """

    benchmark = BENCHMARK
    instruction = INSTRUCTION

    def __init__(
        self,
        splits: str | Path = DEFAULT_SPLITS,
        step_budget: bool = True,
        call_timeout: float = 60.0,
        restarts: int = 2,
        java_opts: Sequence[str] = DEFAULT_JAVA_OPTS,
    ):
        self.protocol = SciWorldSplits.load(splits)
        self.step_budget, self.restarts = step_budget, restarts
        self.max_turns = max(self.protocol.max_steps.values()) if step_budget else LIFTED_MAX_TURNS
        self.restart_count = 0  # restarts over this env's life, for reports
        self._episode: _Episode | None = None
        self._descriptions: dict[str, str] = {}
        self._closed = False
        self.simulator = Simulator(call_timeout, java_opts)

    # --- tasks -----------------------------------------------------------------------------------------------
    def tasks(self, split: str) -> list[Task]:
        """The split's variations; reading a description loads the variation, which ends any episode in progress."""
        return [self.task(name, variation) for name, variation in self.protocol.variations(split)]

    def task(self, task_name: str, variation: int) -> Task:
        if task_name not in self.protocol.max_steps:
            raise ValueError(f"unknown ScienceWorld task {task_name!r}")
        tid = task_id(task_name, variation)
        if tid not in self._descriptions:
            self._episode = None
            self._descriptions[tid] = self._run(lambda sim: self._load(sim, tid)[1], tid)
        meta = {"task_name": task_name, "variation": variation, "max_steps": self.protocol.max_steps[task_name]}
        return Task(tid, self._descriptions[tid], meta)

    def gold_actions(self, task: Task) -> list[str]:
        """The simulator's gold action sequence for the task (ends any episode in progress)."""
        self._episode = None
        gold, self._descriptions[task.id] = self._run(lambda sim: self._load(sim, task.id, gold=True), task.id)
        return list(gold)

    # --- episodes --------------------------------------------------------------------------------------------
    def reset(self, task: Task) -> str:
        """Loads the variation and returns what 'look around' shows (the room the agent starts in)."""
        task_name, _ = parse_task_id(task.id)
        budget = self.protocol.max_steps[task_name] if self.step_budget else LIFTED_MAX_TURNS
        self.max_turns = budget
        self._episode = None
        observation, score = self._run(lambda sim: self._start(sim, task.id), task.id)
        info = {"score": score, "success": False, "valid": True, "turns": 0, "truncated": False}
        self._episode = _Episode(task, budget, StepResult(observation, 0.0, False, info), best=max(0, score))
        return observation

    def step(self, action: str) -> StepResult:
        ep = self._episode
        if ep is None or ep.done:
            raise RuntimeError("no episode in progress: call reset(task) first (or again after done)")
        action = " ".join(action.split())
        if action:
            observation, score, completed = self._run(lambda sim: self._act(sim, action), ep.task.id)
            valid = observation.strip() != NO_MATCH
            ep.actions.append(action)
            ep.scores.append(score)
            ep.observations.append(observation)
        else:  # nothing to send: the simulator's state does not change
            observation = "Invalid action: no action given. Write one after 'Action:'."
            score, completed, valid = ep.last.info["score"], False, False
        ep.turns += 1
        ep.best = max(ep.best, score)
        failed = score < 0
        truncated = ep.turns >= ep.max_turns and not (completed or failed)
        info = {"score": score, "success": ep.best >= 100, "valid": valid, "turns": ep.turns, "truncated": truncated}
        ep.last = StepResult(observation, ep.best / 100, completed or failed or truncated, info)
        return ep.last

    def restore(self, task: Task, actions: Sequence[str]) -> StepResult:
        """Puts the episode in the state after ``actions`` (an expert prefix) by replaying them: the simulator
        cannot snapshot. If the current episode of the same task is already a prefix of ``actions`` only the rest
        is played, so walking along one trajectory costs one replay in total. ``info`` has ``replayed`` (actions
        played now) and ``replay_seconds``. The actions count as turns of the episode (use ``step_budget=False``
        for long prefixes)."""
        t0 = time.perf_counter()
        actions = [" ".join(a.split()) for a in actions]
        ep = self._episode
        if ep is None or ep.task.id != task.id or ep.turns != len(ep.actions) or ep.actions != actions[: ep.turns]:
            self.reset(task)
            ep = self._episode
            assert ep is not None
        replayed = 0
        for action in actions[ep.turns:]:
            if ep.done:
                break
            self.step(action)
            replayed += 1
        info = {**ep.last.info, "replayed": replayed, "replay_seconds": time.perf_counter() - t0}
        return StepResult(ep.last.observation, ep.last.reward, ep.last.done, info)

    @property
    def score(self) -> int | None:
        """The simulator's score now (0-100; after ``reset``, the points the starting state already gives), None
        outside an episode."""
        return None if self._episode is None else self._episode.last.info["score"]

    def memory_bytes(self) -> int | None:
        return self.simulator.memory_bytes()

    def close(self) -> None:
        self._closed = True
        self.simulator.close()

    # --- simulator calls, with restart-and-replay ------------------------------------------------------------
    def _load(self, sim: Simulator, tid: str, gold: bool = False) -> tuple[list[str], str]:
        """Loads a variation outside any episode: (gold action sequence if ``gold``, task description)."""
        task_name, variation = parse_task_id(tid)
        if gold:
            sim.reset_gold_search((*GOLD_SEARCH_WORLD, self.protocol.simplification))
        sim.call("load", task_name, variation, self.protocol.simplification, gold)
        return (list(sim.call("getGoldActionSequence")) if gold else []), sim.call("getTaskDescription")

    def _start(self, sim: Simulator, tid: str) -> tuple[str, int]:
        task_name, variation = parse_task_id(tid)
        # ETO called reset() after load: it reloads the same world (a no-op once identity hashes are fixed), and
        # after any gold-path load in the JVM it also reruns the gold agent, so it is left out
        sim.call("load", task_name, variation, self.protocol.simplification, False)
        observation = sim.call("step", "look around")  # score and state are stale until the first step
        return observation, round(100 * sim.call("getScore"))

    @staticmethod
    def _act(sim: Simulator, action: str) -> tuple[str, int, bool]:
        observation = sim.call("step", action)
        return observation, round(100 * sim.call("getScore")), bool(sim.call("getCompleted"))

    def _replay(self, sim: Simulator, ep: _Episode) -> None:
        """Rebuilds ``ep`` on a fresh JVM; any different answer means a different state: fail, never go on."""
        self._start(sim, ep.task.id)
        for i, (action, score, observation) in enumerate(zip(ep.actions, ep.scores, ep.observations)):
            again, score_again, _ = self._act(sim, action)
            if (again, score_again) != (observation, score):
                sim.kill()
                raise EnvironmentCrashed(
                    f"replay after restart diverged at action {i} ({action!r}): score {score_again}, was {score}; "
                    f"observation {again[:80]!r}, was {observation[:80]!r}"
                )

    def _run(self, fn: Callable[[Simulator], X], what: str) -> X:
        """``fn(simulator)``; when the JVM fails, restart it, replay the episode and try again (``restarts`` times)."""
        failures: list[str] = []
        while True:
            try:
                if not self.simulator.alive:
                    self.simulator.start()
                    self.restart_count += 1
                    if self._episode is not None:
                        self._replay(self.simulator, self._episode)
                return fn(self.simulator)
            except EnvironmentCrashed as e:
                failures.append(str(e))
                if self._closed or len(failures) > self.restarts:
                    self._episode = None  # the episode is lost; the next call starts a fresh JVM
                    raise EnvironmentCrashed(
                        f"{what}: ScienceWorld simulator failed {len(failures)} time(s): " + "; ".join(failures)
                    ) from e


# --- gold paths -------------------------------------------------------------------------------------------------
@dataclass
class GoldRun:
    """One gold path played through the environment."""

    task: Task
    gold: list[str]
    first_observation: str
    steps: list[tuple[str, StepResult]]  # (action, result) as played; stops when the episode ends
    start_score: int = 0  # the simulator's score before the first action

    @property
    def success(self) -> bool:
        return bool(self.steps) and bool(self.steps[-1][1].info["success"])

    @property
    def reward(self) -> float:
        return self.steps[-1][1].reward if self.steps else 0.0

    @property
    def score(self) -> int:
        return round(100 * self.reward)

    def first_success(self) -> int | None:
        """Number of actions after which the score first reached 100."""
        return next((i + 1 for i, (_, r) in enumerate(self.steps) if r.info["success"]), None)

    def result(self) -> dict[str, Any]:
        """What a run's report keeps of it: score, lengths and a digest of every observation (to compare runs)."""
        seen = hashlib.sha1(self.first_observation.encode())
        for action, step in self.steps:
            seen.update(f"\0{action}\0{step.observation}".encode())
        return {"score": self.score, "actions": len(self.steps), "gold_length": len(self.gold),
                "first_success": self.first_success(), "observations_sha1": seen.hexdigest()[:12]}

    def trajectory(self, env: Environment) -> Trajectory:
        """The data contract's record: ReAct turns with the action only (thoughts are optional in expert data)."""
        messages = initial_messages(env, self.task, self.first_observation)
        for action, result in self.steps:
            messages += [{"role": "assistant", "content": f"Action: {action}"}, observation_message(result.observation)]
        meta = {**self.task.meta, "source": "gold", "score": self.score, "gold_length": len(self.gold),
                "start_score": self.start_score, "scores": [r.info["score"] for _, r in self.steps]}
        return Trajectory(self.task.id, self.task.id, messages, self.reward, meta)


def play_gold(env: SciWorldEnv, variation: tuple[str, int]) -> GoldRun:
    """Plays a variation's gold path until the episode ends (completed, failed, or out of budget).

    The gold path is ScienceWorld's own agent playing the variation; like the episode it depends only on the
    variation (see the module's docstring on determinism).
    """
    gold = env.gold_actions(Task(task_id(*variation), ""))
    task = env.task(*variation)  # description cached by gold_actions: no extra load
    first = env.reset(task)
    start_score = env.score
    steps: list[tuple[str, StepResult]] = []
    for action in gold:
        result = env.step(action)
        steps.append((" ".join(action.split()), result))
        if result.done:
            break
    return GoldRun(task, gold, first, steps, start_score)


def _progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="task", dynamic_ncols=True)


def gold(
    benchmark: str = "sciworld",
    split: str = "dev",
    step_budget: bool = False,
    workers: int = 1,
    limit: int | None = None,
    splits: str = str(DEFAULT_SPLITS),
    shuffle_seed: int | None = None,
    output: str | None = None,
) -> dict[str, Any]:
    """Plays every gold path of a split through the environment: checks the environment (rewards, protocol).

    With the step budget lifted (default) it counts the gold paths that reach score 100; with ``step_budget`` it
    counts those that reach it within ETO's per-task budget, i.e. how much of the expert data an evaluation episode
    could reproduce. Prints a table per task type, a digest of every variation's result and ends with
    ``success: MATCHED/TOTAL``. The environment is deterministic, so the digest is the same whatever ``workers`` and
    ``shuffle_seed``: comparing it across runs checks that.

    Args:
        benchmark: only "sciworld" has gold paths.
        split: train, dev or test.
        step_budget: apply ETO's per-task step budgets.
        workers: simulator processes (JVMs) in parallel.
        limit: only the first ``limit`` variations of the split.
        splits: path of ``splits.json``.
        shuffle_seed: play the variations in an order shuffled with this seed (default: the split's order); the
            report keeps the split's order.
        output: also write the summary with every variation's result (``results``) to this JSON file.
    """
    if benchmark != BENCHMARK:
        raise ValueError(f"gold paths exist only for {BENCHMARK!r}, not {benchmark!r}")
    variations = SciWorldSplits.load(splits).variations(split, limit)
    order = list(variations)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    runs: dict[tuple[str, int], GoldRun | EnvironmentCrashed] = {}
    t0 = time.perf_counter()
    with EnvPool(lambda: SciWorldEnv(splits, step_budget=step_budget), workers) as pool, _progress(
        len(order), f"gold {split}"
    ) as bar:
        for variation, run in pool.map(play_gold, order):
            runs[variation] = run
            bar.update()
        memory = [env.memory_bytes() or 0 for env in pool.envs]  # a JVM's heap hardly shrinks: ~ its peak
        restarts = sum(env.restart_count for env in pool.envs)
    wall = time.perf_counter() - t0
    per_type: dict[str, Counter[str]] = {}
    failed: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    fits = steps = 0
    for variation in variations:
        run, tid = runs[variation], task_id(*variation)
        counts = per_type.setdefault(variation[0], Counter())
        counts["total"] += 1
        if isinstance(run, EnvironmentCrashed):
            failed[tid] = f"crashed: {run}"
            results[tid] = {"error": str(run)}
            continue
        results[tid] = run.result()
        steps += len(run.steps)
        reached = run.first_success()
        fits += reached is not None and reached <= run.task.meta["max_steps"]
        if run.success:
            counts["success"] += 1
        else:
            failed[tid] = f"score {run.score} after {len(run.steps)} of {len(run.gold)} gold actions"
    matched = sum(c["success"] for c in per_type.values())
    total = len(variations)
    digest = hashlib.sha1(json.dumps(results, sort_keys=True).encode()).hexdigest()[:12]
    print(f"ScienceWorld gold paths, split {split}, step budget {'applied' if step_budget else 'lifted'}:")
    for name in sorted(per_type):
        print(f"  {name:<50} {per_type[name]['success']:>4}/{per_type[name]['total']}")
    for tid, reason in failed.items():
        print(f"  not matched: {tid}: {reason}")
    if not step_budget:
        print(f"within the step budget: {fits}/{total}")
    print(f"wall time {wall:.1f} s, {steps} environment steps, {steps / wall:.1f} steps/s, {workers} worker(s), "
          f"simulator memory {max(memory) / 2**20:.0f} MiB max, {restarts} restart(s)")
    print(f"results digest {digest} (every variation's score, actions and observations)")
    print(f"success: {matched}/{total}")
    summary = {
        "split": split, "step_budget": step_budget, "success": matched, "total": total,
        "within_budget": fits, "failed": failed, "wall_seconds": wall, "steps": steps,
        "steps_per_second": steps / wall, "workers": workers, "shuffle_seed": shuffle_seed,
        "simulator_memory_bytes": max(memory), "restarts": restarts, "digest": digest, "results": results,
    }
    if output is not None:
        Path(output).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _completed_ids(path: Path) -> set[str]:
    """Ids already written; a line cut short by a crash (no final newline) is dropped so appends stay valid."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    return {json.loads(line)["id"] for line in data.decode("utf-8").splitlines() if line.strip()}


def gold_experts(
    split: str = "train",
    out: str | None = None,
    limit: int | None = None,
    workers: int = 1,
    splits: str = str(DEFAULT_SPLITS),
) -> dict[str, Any]:
    """Writes expert trajectories from the gold paths of a split: only those reaching score 100 (reward 1.0).

    Crash-safe and resumable: one line is appended per finished trajectory, and a re-run skips the ids already in
    ``out`` (so the not-matched ones are tried again). Returns counts and the reason for each one not written.

    Args:
        split: train, dev or test.
        out: JSONL file to append to (default ``sciworld_gold_<split>.jsonl``).
        limit: only the first ``limit`` variations of the split.
        workers: simulator processes (JVMs) in parallel.
        splits: path of ``splits.json``.
    """
    path = Path(out or f"sciworld_gold_{split}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _completed_ids(path)
    todo = [v for v in SciWorldSplits.load(splits).variations(split, limit) if task_id(*v) not in done]
    failed: dict[str, str] = {}
    written = 0
    with EnvPool(lambda: SciWorldEnv(splits, step_budget=False), workers) as pool, _progress(
        len(todo), f"gold experts {split}"
    ) as bar:
        for variation, run in pool.map(play_gold, todo):
            bar.update()
            if isinstance(run, EnvironmentCrashed):
                failed[task_id(*variation)] = f"crashed: {run}"
            elif not run.success:
                failed[run.task.id] = f"score {run.score} after {len(run.steps)} of {len(run.gold)} gold actions"
            else:
                append_jsonl(path, [to_json(run.trajectory(pool.envs[0]))])
                written += 1
    for tid, reason in failed.items():
        print(f"not written: {tid}: {reason}")
    print(f"{written} written, {len(done)} already in {path}, {len(failed)} not matched")
    return {"out": str(path), "written": written, "skipped": len(done), "failed": failed}
