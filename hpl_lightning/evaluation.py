"""Evaluation of a policy as a ReAct agent on a benchmark split, with many episodes in flight.

The loop runs ``workers`` environments (one episode each) in lock step: one batched ``policy.generate`` over every
active episode's conversation, then all their environment steps at once in the pool's threads (a database server or
a JVM does the work, so threads overlap). A finished episode frees its environment for the next task.

Results are crash-safe: every finished episode is appended (and flushed) to ``<output_dir>/episodes.jsonl``, and a
restarted evaluation skips the ids found there. An episode whose environment crashed (``EnvironmentCrashed``: lost
database server, dead simulator) is started again ``retries`` times, then written with its ``error`` and left out
of the averages with ``reward: null`` (flagged in the summary, retried by the next run) — a reward is never guessed.
When several episodes fail in a row the backend is down: the evaluation stops with an ``EvaluationAborted`` that
says so; so does an evaluation in which no episode could be scored at all.

``summary.json`` (average reward, success rate, share of turns with a valid action, per hardness / task type), a
printed table and ``outcomes.png`` (per-task rewards) are written at the end, over every episode in the file. The
valid-action share tells a starting score (ScienceWorld's find-* tasks give points before any action) from skill:
a turn counts as valid when it has a parsable ``Action:`` the environment accepted (``StepResult.info["valid"]``).
"""

from __future__ import annotations

import importlib
import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from hpl_lightning.envs.base import (
    Environment,
    EnvironmentCrashed,
    StepResult,
    Task,
    initial_messages,
    observation_message,
    parse_action,
)
from hpl_lightning.envs.pool import EnvPool
from hpl_lightning.errors import UsageError
from hpl_lightning.policies import Policy
from hpl_lightning.schema import append_jsonl, write_jsonl

EPISODES_FILE, SUMMARY_FILE, PLOT_FILE, RUN_FILE = "episodes.jsonl", "summary.json", "outcomes.png", "run.json"


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to build a benchmark's environment (``"module:Class"``, imported on use so a benchmark's dependencies
    are needed only when it runs) and which ``Task.meta`` key groups its summary."""

    env_class: str
    group_by: str

    def make_env(self, **kwargs: Any) -> Environment:
        module, name = self.env_class.split(":")
        return getattr(importlib.import_module(module), name)(**kwargs)


# Benchmark name -> environment. ALFWorld and WebShop plug in with one line each once their modules exist.
BENCHMARKS: Mapping[str, BenchmarkSpec] = MappingProxyType({
    "intercode_sql": BenchmarkSpec("hpl_lightning.envs.intercode_sql:IntercodeSqlEnv", "hardness"),
    "sciworld": BenchmarkSpec("hpl_lightning.envs.sciworld:SciWorldEnv", "task_name"),
    "alfworld": BenchmarkSpec("hpl_lightning.envs.alfworld:AlfWorldEnv", "task_type"),
    "webshop": BenchmarkSpec("hpl_lightning.envs.webshop:WebShopEnv", "split"),  # no sub-types: one group
})


class EvaluationAborted(RuntimeError):
    """The environment backend keeps failing; finished episodes are saved and a rerun resumes."""


@dataclass
class EpisodeRecord:
    """One line of ``episodes.jsonl``. ``actions[i]`` is None when turn i had no parsable action, ``valid[i]``
    whether it had one the environment accepted; ``error`` is set when the environment crashed on every attempt
    (then ``reward`` is None: unknown, not zero)."""

    id: str
    group: str
    reward: float | None
    success: bool
    turns: int
    actions: list[str | None]
    observations: list[str]
    messages: list[dict[str, str]]
    info: dict[str, Any] = field(default_factory=dict)
    attempts: int = 1
    error: str | None = None
    valid: list[bool] = field(default_factory=list)


@dataclass
class _Episode:
    """An episode in flight on one environment slot."""

    task: Task
    messages: list[dict[str, str]]
    errors: list[str]
    actions: list[str | None] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)


@dataclass
class _Stats:
    """Where this run's time went, for the summary."""

    episodes: int = 0
    env_steps: int = 0
    generation_seconds: float = 0.0
    env_seconds: float = 0.0


def read_episodes(path: Path) -> list[EpisodeRecord]:
    """The records of ``path``; a last line cut short by a kill is dropped from the file, so appends stay valid."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(EpisodeRecord(**json.loads(line)))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1} is not valid JSON (only a last line cut short is expected)")
            write_jsonl(path, [asdict(r) for r in records])
    return records


def _check_run(output_dir: Path, identity: dict[str, Any]) -> None:
    """Refuses to resume into a directory that holds another benchmark, split or policy."""
    path = output_dir / RUN_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != identity:
            raise UsageError(
                f"{output_dir} holds an evaluation of {previous}, not {identity}; use another output_dir"
            )
    else:
        path.write_text(json.dumps(identity, indent=2) + "\n")


def evaluate(
    policy: Policy,
    benchmark: str,
    split: str,
    output_dir: str | Path,
    workers: int = 4,
    limit: int | None = None,
    task_ids: Sequence[str] | None = None,
    env_kwargs: Mapping[str, Any] | None = None,
    retries: int = 1,
    max_failures_in_a_row: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs ``policy`` on the tasks of ``benchmark``/``split`` not yet in ``output_dir`` and returns the summary.

    Args:
        policy: writes the agent turns (decode greedily for evaluation).
        benchmark: a key of ``BENCHMARKS``.
        split: e.g. test/train (intercode_sql), dev/test (sciworld).
        output_dir: episodes.jsonl, summary.json, outcomes.png and run.json (what was evaluated, checked on resume).
        workers: environments, i.e. episodes in flight (and the model's batch size per turn).
        limit: only the first ``limit`` tasks of the split (a later run with a larger limit adds the rest).
        task_ids: only these tasks (in split order).
        env_kwargs: passed to the environment class (e.g. ``db_url``, ``call_timeout``).
        retries: how often an episode whose environment crashed is started again before it is recorded as failed.
        max_failures_in_a_row: this many failed episodes without a success in between abort the evaluation.
        progress: show a progress bar.
    """
    if benchmark not in BENCHMARKS:
        raise UsageError(f"unknown benchmark {benchmark!r}; expected one of {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[benchmark]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, {"benchmark": benchmark, "split": split, "policy": policy.describe()})
    path = out / EPISODES_FILE
    records = read_episodes(path)
    failed_before = [r for r in records if r.error is not None]
    if failed_before:  # failed episodes are tried again: keep the file one line per task
        records = [r for r in records if r.error is None]
        write_jsonl(path, [asdict(r) for r in records])
        print(f"retrying {len(failed_before)} episode(s) that failed in an earlier run")
    done = {r.id for r in records}
    stats = _Stats()
    t0 = time.perf_counter()
    with EnvPool(lambda: spec.make_env(**(env_kwargs or {})), workers) as pool:
        tasks = pool.envs[0].tasks(split)
        if task_ids is not None:
            unknown = set(task_ids) - {t.id for t in tasks}
            if unknown:
                raise UsageError(f"task ids not in {benchmark}/{split}: {sorted(unknown)[:10]}")
            tasks = [t for t in tasks if t.id in set(task_ids)]
        tasks = tasks[:limit]
        todo = [t for t in tasks if t.id not in done]
        print(f"{benchmark}/{split}: {len(tasks)} tasks, {len(tasks) - len(todo)} already in {path}, "
              f"{len(todo)} to run with {pool.size} environment(s)")
        with tqdm(total=len(todo), desc=f"{benchmark}/{split}", unit="episode", disable=not progress) as bar:
            _run(policy, pool, spec, todo, path, records, retries, max_failures_in_a_row, stats, bar)
        memory = [getattr(env, "memory_bytes", lambda: None)() for env in pool.envs]
    wall = time.perf_counter() - t0
    # episodes were appended as they finished, an order that depends on the pool size and the machine's load
    position = {t.id: i for i, t in enumerate(tasks)}
    records.sort(key=lambda r: position.get(r.id, len(position)))
    write_jsonl(path, [asdict(r) for r in records])
    run = {**asdict(stats), "wall_seconds": wall, "workers": pool.size,
           "env_steps_per_second": stats.env_steps / wall if wall else 0.0,
           "env_memory_bytes": [m for m in memory if m is not None]}
    summary = summarize(records, benchmark, split, policy.describe(), len(tasks), run)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    plot_outcomes(records, [t.id for t in tasks], out / PLOT_FILE, f"{benchmark}/{split}")
    print(format_summary(summary))
    failed = [r for r in records if r.error is not None]
    if failed and not summary["n"]:
        raise EvaluationAborted(f"no episode could be scored: all {len(failed)} failed; first ({failed[0].id}): "
                                f"{failed[0].error}")
    return summary


def _run(
    policy: Policy,
    pool: EnvPool,
    spec: BenchmarkSpec,
    tasks: list[Task],
    path: Path,
    records: list[EpisodeRecord],
    retries: int,
    max_failures_in_a_row: int,
    stats: _Stats,
    bar: tqdm,
) -> None:
    """The lock-step loop: start episodes on free environments, generate for all active ones, step them all."""
    todo: deque[tuple[Task, list[str]]] = deque((task, []) for task in tasks)  # (task, errors of earlier attempts)
    active: dict[int, _Episode] = {}
    failures_in_a_row = 0

    def finish(ep: _Episode, last: StepResult | None) -> None:
        nonlocal failures_in_a_row
        error = "; ".join(f"attempt {i + 1}: {e}" for i, e in enumerate(ep.errors)) if last is None else None
        record = EpisodeRecord(
            id=ep.task.id,
            group=str(ep.task.meta.get(spec.group_by, "all")),
            reward=last.reward if last is not None else None,
            success=bool(last.info.get("success", last.reward >= 1.0)) if last is not None else False,
            turns=len(ep.actions),
            actions=ep.actions,
            observations=ep.observations,
            messages=ep.messages,
            info=last.info if last is not None else {},
            attempts=len(ep.errors) + 1 if last is not None else len(ep.errors),
            error=error,
            valid=ep.valid,
        )
        append_jsonl(path, [asdict(record)])
        records.append(record)
        stats.episodes += 1
        bar.update()
        scored = [r for r in records if r.error is None]
        bar.set_postfix(reward=f"{sum(r.reward for r in scored) / max(1, len(scored)):.3f}",
                        failed=len(records) - len(scored), refresh=False)
        failures_in_a_row = failures_in_a_row + 1 if error else 0
        if failures_in_a_row >= max_failures_in_a_row:
            raise EvaluationAborted(
                f"{failures_in_a_row} episodes in a row failed, the environment backend looks down; last: {error}. "
                f"Finished episodes are in {path}; fix the backend and run again to resume (failed ones are retried)."
            )

    def crashed(ep: _Episode, error: EnvironmentCrashed) -> None:
        ep.errors.append(str(error))
        if len(ep.errors) <= retries:
            todo.appendleft((ep.task, ep.errors))  # a fresh episode: nothing of the crashed one is kept
        else:
            finish(ep, None)

    while todo or active:
        starting = {slot: todo.popleft() for slot in range(pool.size) if slot not in active and todo}
        t = time.perf_counter()
        started = pool.each({slot: (lambda env, task=task: env.reset(task)) for slot, (task, _) in starting.items()})
        stats.env_seconds += time.perf_counter() - t
        for slot, first in started.items():
            task, errors = starting[slot]
            ep = _Episode(task, [], errors)
            if isinstance(first, EnvironmentCrashed):
                crashed(ep, first)
            else:
                ep.messages = initial_messages(pool.envs[slot], task, first)
                active[slot] = ep
        if not active:
            continue
        t = time.perf_counter()
        texts = policy.generate([ep.messages for ep in active.values()])
        stats.generation_seconds += time.perf_counter() - t
        actions = {}
        for (slot, ep), text in zip(active.items(), texts):
            ep.messages.append({"role": "assistant", "content": text})
            ep.actions.append(parse_action(text))
            actions[slot] = ep.actions[-1] or ""  # the environment answers a missing action with its own message
        t = time.perf_counter()
        results = pool.each({slot: (lambda env, a=action: env.step(a)) for slot, action in actions.items()})
        stats.env_seconds += time.perf_counter() - t
        stats.env_steps += len(results)
        for slot, result in results.items():
            ep = active[slot]
            if isinstance(result, EnvironmentCrashed):
                del active[slot]
                crashed(ep, result)
                continue
            ep.observations.append(result.observation)
            ep.valid.append(ep.actions[-1] is not None and bool(result.info.get("valid", True)))
            ep.messages.append(observation_message(result.observation))
            if result.done:
                del active[slot]
                finish(ep, result)


def summarize(
    records: list[EpisodeRecord],
    benchmark: str,
    split: str,
    policy: dict[str, Any],
    n_tasks: int,
    run: dict[str, Any],
) -> dict[str, Any]:
    """Average reward, success rate and valid-action share over the scored episodes (failed ones are counted and
    listed apart)."""

    def stats(rs: list[EpisodeRecord]) -> dict[str, Any]:
        scored = [r for r in rs if r.error is None]
        n = len(scored)
        turns = sum(len(r.valid) for r in scored)
        return {
            "n": n,
            "avg_reward": sum(r.reward for r in scored) / n if n else None,
            "success_rate": sum(r.success for r in scored) / n if n else None,
            "valid_action_rate": sum(sum(r.valid) for r in scored) / turns if turns else None,
            "failed": len(rs) - n,
        }

    groups = sorted({r.group for r in records})
    failed = [r.id for r in records if r.error is not None]
    return {
        "benchmark": benchmark,
        "split": split,
        "policy": policy,
        **stats(records),
        "tasks": n_tasks,
        "complete": len(records) - len(failed) >= n_tasks and not failed,
        "failed_ids": failed,
        "first_error": next((f"{r.id}: {r.error}" for r in records if r.error is not None), None),
        "groups": {g: stats([r for r in records if r.group == g]) for g in groups},
        "run": run,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a text table (rewards and rates in percent, as papers report them)."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    width = max([len("all"), *map(len, summary["groups"])])
    lines = [f"{summary['benchmark']}/{summary['split']}: {summary['n']} scored of {summary['tasks']} tasks"
             + (f", {summary['failed']} FAILED (environment crashed, not scored)" if summary["failed"] else ""),
             *([f"first failure: {summary['first_error']}"] if summary.get("first_error") else []),
             f"{'group':<{width}}  {'n':>5}  {'avg reward':>10}  {'success %':>9}  {'valid act %':>11}  {'failed':>6}"]
    for name, s in [*summary["groups"].items(), ("all", summary)]:
        lines.append(f"{name:<{width}}  {s['n']:>5}  {pct(s['avg_reward']):>10}  {pct(s['success_rate']):>9}  "
                     f"{pct(s.get('valid_action_rate')):>11}  {s['failed']:>6}")
    run = summary["run"]
    lines.append(f"this run: {run['episodes']} episodes, {run['env_steps']} env steps in {run['wall_seconds']:.1f} s "
                 f"({run['env_steps_per_second']:.2f} steps/s; generation {run['generation_seconds']:.1f} s, "
                 f"environments {run['env_seconds']:.1f} s), {run['workers']} worker(s)")
    return "\n".join(lines)


def plot_outcomes(records: list[EpisodeRecord], order: list[str], path: Path, title: str) -> None:
    """Per-task reward in split order, coloured by group, failed episodes as red crosses; per-group means beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    position = {tid: i for i, tid in enumerate(order)}
    shown = [r for r in records if r.id in position]
    groups = sorted({r.group for r in shown})
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    colours = plt.get_cmap("tab20")
    for k, group in enumerate(groups):
        rs = [r for r in shown if r.group == group and r.error is None]
        ax.scatter([position[r.id] for r in rs], [r.reward for r in rs], s=12, color=colours(k % 20), label=group)
    failed = [r for r in shown if r.error is not None]
    if failed:
        ax.scatter([position[r.id] for r in failed], [0.0] * len(failed), marker="x", color="red", s=30,
                   label="failed (not scored)")
    ax.set(xlabel="task (split order)", ylabel="reward", ylim=(-0.05, 1.05), xlim=(-1, max(len(order), 1)),
           title=f"{title}: per-task reward")
    if shown and len(groups) <= 12:
        ax.legend(fontsize=7, loc="center right")
    means = []
    for group in groups:
        rs = [r for r in shown if r.group == group and r.error is None]
        means.append(sum(r.reward for r in rs) / len(rs) if rs else 0.0)
    bars.barh(range(len(groups)), means, color=[colours(k % 20) for k in range(len(groups))])
    bars.set_yticks(range(len(groups)), [g[:28] for g in groups], fontsize=7)
    bars.set(xlabel="avg reward", xlim=(0, 1), title="per group")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
