"""Exploration from expert prefixes with Monte-Carlo estimates (HPL §2.2): the rollouts pairs are built from.

Three levels, each a *plan* per expert trajectory (and per prefix or group) that asks for rollouts and reacts to
their results (a Python generator: it yields a list of ``RolloutJob`` and receives their ``Rollout`` s):
- trajectory: one greedy episode per task;
- step (IPR): at prefix t the agent proposes one action (temperature 1.0), resampled up to ``max_tries`` times while
  it equals the expert's a_t (whitespace-normalised command, as for groups); M completions after that alternative
  â_t and M after the expert's a_t give both MC step values, each side getting the same ``max_actions`` actions
  after its branch action. With a cap that stops short of the expert's end, the expert's own actions are replayed
  up to the same cut (``expert_cut``), so the final-reward filter compares rewards reached after as many actions;
- group: from each group's start, tries of the group's length (temperature 1.0, the real environment stepped
  between actions) until ``max_negatives`` distinct ones are found or ``max_tries`` are spent; M completions after
  the expert group and after each negative give r̂(G).

All rollouts of all plans run in one lock-step loop over an ``EnvPool``: every turn, one batched ``generate`` per
temperature over all in-flight episodes, then all their environment steps at once. A rollout restores its start state
by replaying the expert prefix (InterCode-SQL: reset and re-execute; ScienceWorld: ``restore``).

Crash safety: each finished rollout is appended (flushed) to the output JSONL under a stable key; on a re-run the
plans are replayed against the file, so a finished rollout is never run twice and an unfinished one is run again.
A rollout whose environment crashes on every attempt (or raises anything, e.g. ``MemoryError``) is written with its
``error`` and reward null; pairs leave it out, the exploration goes on, and a re-run runs it again. Several failures
in a row mean the backend is down: ``ExplorationAborted``.

Where the environment reports a score after each action (ScienceWorld's ``info['score']``, 0-100), a rollout keeps
it in ``meta.scores``, one per action it took: the sub-goals it met, not only its final reward.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections import Counter, defaultdict, deque
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, Sequence

from tqdm.auto import tqdm

from hpl_lightning.envs.base import Environment, EnvironmentCrashed, StepResult, Task, observation_message, parse_action
from hpl_lightning.envs.pool import EnvPool
from hpl_lightning.pairs import (
    Message,
    Rollout,
    accepted_tries,
    expert_actions,
    expert_signature,
    rollout_key,
    task_head,
    through_observation,
)
from hpl_lightning.errors import DataError, UsageError
from hpl_lightning.policies import Policy
from hpl_lightning.schema import Trajectory, append_jsonl, decode_jsonl_line
from hpl_lightning.segmentation import action_indices

LEVELS = ("trajectory", "step", "group")


@dataclass(frozen=True)
class ExploreConfig:
    """What to explore and how much; the paper's values where it gives them (M = 5, up to 3 negatives in 10 tries,
    §2.2 and Appendix), else the authors' release (docs/authors-release.md says where the two differ)."""

    levels: tuple[str, ...] = LEVELS
    mc_samples: int = 5  # M: completions per MC estimate; the paper's M = 5 (the release: 4 per step candidate)
    max_negatives: int = 3  # the paper; the release's generate_negative_groups.py --neg_group_num 3
    max_tries: int = 10  # per group (paper; release --max_tries 10), and per step alternative (ours: same budget)
    step_stride: int = 1  # step level at prefixes t = 0, stride, 2*stride, ... (bounds the cost on long trajectories)
    max_steps_per_task: int | None = None  # ...and at most this many of them
    max_groups_per_task: int | None = None
    # agent actions per rollout after its replayed prefix (branch actions replayed, never counted), before it is cut
    # (None: the environment's budget)
    max_actions: int | None = None
    # the trajectory level's greedy episode is an evaluation episode whatever max_actions: ETO's failed trajectory is
    # a whole episode (one cut after max_actions scores below the expert because it stopped), played to the task's
    # evaluation budget (``Task.meta['max_steps']``: exploration may lift the environment's own, as sciworld's does
    # for long expert prefixes), else to the environment's
    trajectory_to_end: bool = True
    retries: int = 2  # an episode whose environment crashed is restarted this often, then recorded as failed
    max_failures_in_a_row: int = 3  # this many failed rollouts without a finished one between: the backend is down


@dataclass(frozen=True)
class RolloutJob:
    """A rollout to run: replay ``replay`` (env commands) on ``task``, then let the policy continue ``prompt``."""

    key: str
    task_id: str
    level: str
    index: int
    role: str
    sample: int
    task: Task
    replay: list[str]
    prompt: list[Message]
    sampled: bool  # temperature 1.0 (else greedy)
    max_actions: int | None  # policy actions after the replay (0: replay only, nothing generated)
    parent: int | None = None


Plan = Generator[list[RolloutJob], list[Rollout], None]


@dataclass
class Timer:
    """Where the time went, per rollout role: generation, environment steps, prefix replay (restore)."""

    seconds: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    rollouts: Counter = field(default_factory=Counter)
    env_steps: Counter = field(default_factory=Counter)

    def add(self, what: str, roles: Sequence[str], seconds: float) -> None:
        """Splits a batched call's wall time evenly over the episodes it served."""
        for role in roles:
            self.seconds[role][what] += seconds / len(roles)

    def summary(self, wall: float) -> dict[str, Any]:
        total = sum(self.rollouts.values())
        totals = Counter()
        for c in self.seconds.values():
            totals.update(c)
        return {
            "wall_seconds": wall, "rollouts": total, "rollouts_per_second": total / wall if wall else 0.0,
            "env_steps": sum(self.env_steps.values()), "seconds": dict(totals),
            "per_role": {role: {"rollouts": self.rollouts[role], "env_steps": self.env_steps[role],
                                **{k: round(v, 3) for k, v in self.seconds[role].items()}}
                         for role in sorted(set(self.rollouts) | set(self.seconds))},
        }


def format_timer(s: dict[str, Any]) -> str:
    sec = s["seconds"]
    lines = [f"{s['rollouts']} rollouts in {s['wall_seconds']:.1f} s ({s['rollouts_per_second']:.2f} rollouts/s), "
             f"{s['env_steps']} env steps; generate {sec.get('generate', 0):.1f} s, env step {sec.get('step', 0):.1f} s, "
             f"restore (prefix replay) {sec.get('restore', 0):.1f} s"]
    for role, r in s["per_role"].items():
        lines.append(f"  {role:<12} {r['rollouts']:>5} rollouts {r['env_steps']:>6} steps  generate "
                     f"{r.get('generate', 0):7.1f} s  step {r.get('step', 0):7.1f} s  restore {r.get('restore', 0):7.1f} s")
    return "\n".join(lines)


class ExplorationAborted(RuntimeError):
    """An environment kept crashing; finished rollouts are saved and a re-run resumes."""


# ------------------------------------------------------------------------------------------------ plans
def _job(expert: Trajectory, level: str, index: int, role: str, sample: int, task: Task, replay: list[str],
         prompt: list[Message], sampled: bool, max_actions: int | None, parent: int | None = None) -> RolloutJob:
    return RolloutJob(rollout_key(expert.id, level, index, role, sample, parent), expert.id, level, index, role,
                      sample, task, replay, prompt, sampled, max_actions, parent)


def trajectory_plan(expert: Trajectory, task: Task, config: ExploreConfig) -> Plan:
    cap = task.meta.get("max_steps") if config.trajectory_to_end else config.max_actions
    yield [_job(expert, "trajectory", 0, "agent", 0, task, [], task_head(expert), False, cap)]


def step_plan(expert: Trajectory, task: Task, t: int, config: ExploreConfig) -> Plan:
    at, actions, m = action_indices(expert.messages), expert_actions(expert), config.mc_samples
    prefix = expert.messages[: at[t]]
    signature = expert_signature(expert, t, t)

    def tries(first: int) -> list[RolloutJob]:  # one at a time: most first tries differ from the expert's action
        return [_job(expert, "step", t, "try", first, task, actions[:t], prefix, True, 1)]

    expert_mc = [_job(expert, "step", t, "expert_mc", k, task, actions[: t + 1],
                      through_observation(expert.messages, at, t), True, config.max_actions) for k in range(m)]
    # the expert's side after as many actions as the agent's rollouts get (a_t and max_actions more), when that
    # stops short of its end: replayed, nothing generated
    kept = len(at) - t if config.max_actions is None else min(1 + config.max_actions, len(at) - t)
    cut = [_job(expert, "step", t, "expert_cut", kept, task, actions[: t + kept], prefix, False, 0)
           ] if kept < len(at) - t else []
    done: list[Rollout] = list((yield expert_mc + cut + tries(0))[m + len(cut):])
    alternative = accepted_tries(signature, done, 1, 1)
    # resampled while the tries equal the expert's action; a failed try ends it (a re-run runs that try again)
    while not alternative and len(done) < config.max_tries and done[-1].error is None:
        done += (yield tries(len(done)))
        alternative = accepted_tries(signature, done, 1, 1)
    if alternative:
        first = alternative[0]
        replay = actions[:t] + [first.actions[0] or ""]
        yield [_job(expert, "step", t, "proposal_mc", k, task, replay, prefix + first.messages, True,
                    config.max_actions, parent=first.sample) for k in range(m)]


def group_plan(expert: Trajectory, task: Task, i: int, group: Sequence[int], config: ExploreConfig) -> Plan:
    at, actions, m = action_indices(expert.messages), expert_actions(expert), config.mc_samples
    s, e = group
    length = e - s + 1
    prefix = expert.messages[: at[s]]
    signature = expert_signature(expert, s, e)

    def tries(first: int, n: int) -> list[RolloutJob]:
        return [_job(expert, "group", i, "try", k, task, actions[:s], prefix, True, length)
                for k in range(first, first + n)]

    expert_mc = [_job(expert, "group", i, "expert_mc", k, task, actions[: e + 1],
                      through_observation(expert.messages, at, e), True, config.max_actions) for k in range(m)]
    n = min(config.max_negatives, config.max_tries)
    done: list[Rollout] = list((yield expert_mc + tries(0, n))[m:])
    negatives = accepted_tries(signature, done, length, config.max_negatives)
    while len(negatives) < config.max_negatives and len(done) < config.max_tries:
        n = min(config.max_negatives - len(negatives), config.max_tries - len(done))
        done += (yield tries(len(done), n))
        negatives = accepted_tries(signature, done, length, config.max_negatives)
    jobs = []
    for neg in negatives:
        replay = actions[:s] + [a or "" for a in neg.actions]
        jobs += [_job(expert, "group", i, "negative_mc", k, task, replay, prefix + neg.messages, True,
                      config.max_actions, parent=neg.sample) for k in range(m)]
    if jobs:
        yield jobs


def plans(experts: Sequence[Trajectory], resolve: Callable[[Trajectory], Task], config: ExploreConfig) -> Iterator[Plan]:
    """Every plan of every expert trajectory, task by task (so one task's rollouts run close together)."""
    for expert in experts:
        task = resolve(expert)
        n = len(action_indices(expert.messages))
        if "trajectory" in config.levels:
            yield trajectory_plan(expert, task, config)
        if "step" in config.levels:
            for t in list(range(0, n, config.step_stride))[: config.max_steps_per_task]:
                yield step_plan(expert, task, t, config)
        if "group" in config.levels:
            groups = expert.meta.get("groups")
            if groups is None:
                raise UsageError(f"{expert.id}: no meta['groups']; run `pipeline segment` first")
            for i, g in list(enumerate(groups))[: config.max_groups_per_task]:
                yield group_plan(expert, task, i, g, config)


def count_plans(experts: Sequence[Trajectory], config: ExploreConfig) -> int:
    n = 0
    for expert in experts:
        actions = len(action_indices(expert.messages))
        n += "trajectory" in config.levels
        if "step" in config.levels:
            n += len(list(range(0, actions, config.step_stride))[: config.max_steps_per_task])
        if "group" in config.levels:
            n += len(list(enumerate(expert.meta.get("groups") or []))[: config.max_groups_per_task])
    return n


# ------------------------------------------------------------------------------------------------ the loop
def read_rollouts(path: Path) -> dict[str, Rollout]:
    """Finished rollouts by key, in key order: the file's order (finish order) depends on the pool size and the
    machine's load, and pairs are built in this order. A last line without its newline (a write cut short by a kill,
    or one in progress) is not a finished rollout and is skipped; any other bad line raises DataError naming it."""
    if not path.exists():
        return {}
    out: dict[str, Rollout] = {}
    required = [f.name for f in fields(Rollout) if f.default is MISSING and f.default_factory is MISSING]
    known = {f.name for f in fields(Rollout)}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n") or not raw.strip():
                continue
            obj = decode_jsonl_line(raw, path, lineno)
            if not isinstance(obj, dict):
                raise DataError(path, lineno, None, "expected a JSON object (a rollout)")
            for name in required:
                if name not in obj:
                    raise DataError(path, lineno, name, "missing")
            for name in obj:
                if name not in known:
                    raise DataError(path, lineno, name, f"unknown field of a rollout (expected {sorted(known)})")
            r = Rollout(**obj)
            out[r.key] = r
    return dict(sorted(out.items()))


def repair_partial_line(path: Path) -> int:
    """Cuts a last line left without its newline by a kill, so appends stay valid JSONL; returns the bytes cut.
    Truncates in place (never rewrites the file); the caller holds :func:`output_lock`."""
    if not path.exists():
        return 0
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        keep = size
        while keep > 0:  # scan back in blocks for the last newline
            start = max(0, keep - 65536)
            f.seek(start)
            block = f.read(keep - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            keep = start
        if keep != size:
            f.truncate(keep)
    return size - keep


class OutputLocked(UsageError):
    """Another process is writing the same output file."""


@contextlib.contextmanager
def output_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` for one writer at a time, held through the sidecar ``<path>.lock`` (which
    names the holder: pid, host, start time); released when the block ends or the process dies."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OutputLocked(f"{path} is being written by {holder} (lock: {lock}); wait for it to finish or "
                               "write to another --output") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def restore(env: Environment, task: Task, actions: Sequence[str]) -> StepResult | None:
    """Puts ``env`` in the state after ``actions``: the environment's own ``restore`` if it has one (ScienceWorld
    replays only what it must), else reset and step. Returns the last step's result (None without actions)."""
    own = getattr(env, "restore", None)
    if own is not None:
        result = own(task, actions)
        return result if actions else None
    env.reset(task)
    result = None
    for action in actions:
        result = env.step(action)
        if result.done:
            break
    return result


@dataclass
class _Running:
    job: RolloutJob
    messages: list[Message]
    new: list[Message] = field(default_factory=list)
    actions: list[str | None] = field(default_factory=list)
    last: StepResult | None = None
    attempts: int = 1
    scores: list[float] = field(default_factory=list)  # info['score'] after each action, where the env gives one


class Explorer:
    """Runs plans to completion over a pool, appending each finished rollout to ``path``; the caller holds
    :func:`output_lock` on it."""

    def __init__(self, pool: EnvPool, policies: dict[bool, Policy], path: Path, config: ExploreConfig,
                 progress: bool = True):
        self.pool, self.policies, self.path, self.config = pool, policies, path, config
        repair_partial_line(path)
        self.done = {k: r for k, r in read_rollouts(path).items() if r.error is None}  # failed ones run again
        self.resumed = len(self.done)
        self.timer = Timer()
        self.progress = progress

    def run(self, all_plans: Iterator[Plan], total: int) -> dict[str, Any]:
        queue: deque[tuple[RolloutJob, int]] = deque()  # (job, attempts so far)
        waiting: dict[int, tuple[Plan, list[RolloutJob], dict[str, Rollout]]] = {}
        job_plan: dict[str, int] = {}
        active: dict[int, _Running] = {}
        next_id = 0
        plan_bar = tqdm(total=total, desc="plans", unit="plan", disable=not self.progress, position=0)
        bar = tqdm(desc="rollouts", unit="rollout", disable=not self.progress, position=1)
        t0 = time.perf_counter()

        def advance(pid: int, plan: Plan, results: list[Rollout] | None) -> None:
            """Feeds a plan its results until it asks for rollouts that are not in the file yet, or ends."""
            while True:
                try:
                    jobs = next(plan) if results is None else plan.send(results)
                except StopIteration:
                    plan_bar.update()
                    return
                found = {j.key: self.done[j.key] for j in jobs if j.key in self.done}
                if len(found) == len(jobs):
                    results = [found[j.key] for j in jobs]
                    continue
                waiting[pid] = (plan, jobs, found)
                for j in jobs:
                    if j.key not in found:
                        job_plan[j.key] = pid
                        queue.append((j, 0))
                return

        failures_in_a_row = 0

        def finish(run: _Running, reward: float | None, done: bool, error: str | None = None) -> None:
            nonlocal failures_in_a_row
            job = run.job
            rollout = Rollout(job.key, job.task_id, job.level, job.index, job.role, job.sample, run.new, run.actions,
                              reward, done, job.parent, error, {"scores": run.scores} if run.scores else {})
            failures_in_a_row = failures_in_a_row + 1 if error is not None else 0
            append_jsonl(self.path, [asdict(rollout)])
            self.done[job.key] = rollout
            self.timer.rollouts[job.role] += 1
            bar.update()
            pid = job_plan.pop(job.key)
            plan, jobs, found = waiting[pid]
            found[job.key] = rollout
            if len(found) == len(jobs):
                del waiting[pid]
                advance(pid, plan, [found[j.key] for j in jobs])

        def crashed(run: _Running, error: EnvironmentCrashed) -> None:
            if run.attempts <= self.config.retries:
                queue.appendleft((run.job, run.attempts))
                return
            finish(run, None, False, f"environment crashed {run.attempts} time(s), last: {error}")
            if failures_in_a_row >= self.config.max_failures_in_a_row:
                raise ExplorationAborted(f"{failures_in_a_row} rollouts in a row failed, the environment backend "
                                         f"looks down; last: {run.job.key}: {error}. Finished rollouts are in "
                                         f"{self.path}; run again to resume (failed ones are run again).")

        plans_iter = iter(all_plans)
        try:
            while True:
                while len(queue) < 2 * self.pool.size:  # plans start lazily: a few rollouts queued per env
                    plan = next(plans_iter, None)
                    if plan is None:
                        break
                    advance(next_id, plan, None)
                    next_id += 1
                if not queue and not active:
                    break
                self._fill(queue, active, finish, crashed)
                if active:
                    self._turn(active, finish, crashed)
        finally:
            plan_bar.close()
            bar.close()
            for plan, _, _ in waiting.values():
                plan.close()
        return self.timer.summary(time.perf_counter() - t0)

    def _fill(self, queue, active, finish, crashed) -> None:
        """Starts queued jobs on free environments: each replays its prefix (concurrently across environments)."""
        starting = {slot: queue.popleft() for slot in range(self.pool.size) if slot not in active and queue}
        if not starting:
            return
        t = time.perf_counter()
        restored = self.pool.each({slot: (lambda env, j=job: restore(env, j.task, j.replay))
                                   for slot, (job, _) in starting.items()})
        self.timer.add("restore", [job.role for job, _ in starting.values()], time.perf_counter() - t)
        for slot, result in restored.items():
            job, attempts = starting[slot]
            run = _Running(job, list(job.prompt), attempts=attempts + 1)
            if isinstance(result, EnvironmentCrashed):
                crashed(run, result)
            elif result is not None and (result.done or job.max_actions == 0):
                finish(run, result.reward, result.done)  # the prefix ended the episode, or only replays it
            else:
                run.last = result
                active[slot] = run

    def _turn(self, active: dict[int, _Running], finish, crashed) -> None:
        """One batched generation per temperature over the active episodes, then all their environment steps."""
        for sampled in (False, True):
            slots = [s for s, r in active.items() if r.job.sampled is sampled]
            if not slots:
                continue
            t = time.perf_counter()
            # keyed by rollout and turn: a served policy seeds each request from it (distinct, reproducible samples)
            keys = [f"{active[s].job.key}/turn{len(active[s].actions)}" for s in slots]
            texts = self.policies[sampled].generate([active[s].messages for s in slots], keys)
            self.timer.add("generate", [active[s].job.role for s in slots], time.perf_counter() - t)
            for s, text in zip(slots, texts):
                run = active[s]
                turn = {"role": "assistant", "content": text}
                run.messages.append(turn)
                run.new.append(turn)
                run.actions.append(parse_action(text))
        t = time.perf_counter()
        results = self.pool.each({s: (lambda env, a=r.actions[-1] or "": env.step(a)) for s, r in active.items()})
        self.timer.add("step", [r.job.role for r in active.values()], time.perf_counter() - t)
        for slot, result in results.items():
            run = active[slot]
            if isinstance(result, EnvironmentCrashed):
                del active[slot]
                crashed(run, result)
                continue
            self.timer.env_steps[run.job.role] += 1
            if "score" in result.info:
                run.scores.append(result.info["score"])
            obs = observation_message(result.observation)
            run.messages.append(obs)
            run.new.append(obs)
            run.last = result
            cap = run.job.max_actions
            if result.done or (cap is not None and len(run.actions) >= cap):
                del active[slot]
                finish(run, result.reward, result.done)
