"""Fidelity check: replays recorded InterCode-SQL episodes through ``IntercodeSqlEnv`` and compares rewards.

Two recording styles (InterCode's experiment drivers), told apart per episode:
- ReAct (``eval_react.py``): actions ``execute[SQL]`` / ``submit``; only ``submit`` is scored, with the result of the
  last executed query; turns without code did not touch the environment.
- multi-turn (``eval_n_turn.py``): raw SQL actions, each executed and scored against the gold result; turns where the
  policy wrote no code ("blocked", or the template's retry message as observation) were not executed and scored 0.

An episode agrees when every recorded reward is reproduced within ``tolerance``. Episodes that changed their database
are counted apart: InterCode scored them on a mutated database shared by all later episodes, which this environment
never does. Disagreements are listed with a likely cause, row order first: MariaDB returns the rows of a query without
a total ORDER BY in its own order (it sorts GROUP BY output, MySQL 8 does not), which changes the Kendall-tau factor.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hpl_lightning.errors import DataError
from hpl_lightning.schema import append_jsonl, decode_jsonl_line, read_items

from hpl_lightning.envs.base import EnvironmentCrashed
from hpl_lightning.envs.intercode_sql import (
    DEFAULT_DATA_DIR,
    IntercodeSqlEnv,
    QueryResult,
    intercode_reward,
    parse_react_action,
)

START_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "start_mysql.sh"
RETRY_MARKER = "code was found in your last response"  # InterCode's multi-turn retry message


@dataclass(frozen=True)
class Disagreement:
    """One episode whose replayed rewards differ from the recorded ones, and what the difference looks like."""

    task_id: str
    turn: int
    recorded: float
    replayed: float
    cause: str
    sql: str
    gold: str


class ReplayStopped(RuntimeError):
    """The server failed mid-replay; finished episodes are recorded and a rerun resumes."""


def _read_outcomes(path: Path) -> list[dict[str, Any]]:
    """Recorded outcomes; a last line cut short by a kill is ignored (and overwritten by the next append's line)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("rb+") as f:
            f.truncate(data.rfind(b"\n") + 1)
    return [decode_jsonl_line(raw, path, n) for n, raw in enumerate(data.splitlines(keepends=True), 1)
            if raw.endswith(b"\n") and raw.strip()]


def start_server() -> str:
    """Runs ``scripts/start_mysql.sh`` (idempotent) and returns its URL."""
    done = subprocess.run([str(START_SCRIPT)], check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def _style(turn_history: dict[str, Any]) -> str:
    actions = turn_history["actions"]
    return "react" if any(a == "submit" or a.startswith("execute[") for a in actions) else "multiturn"


def _cause(result: QueryResult, gold: list[tuple[Any, ...]], recorded_observation: str | None) -> str:
    """A short diagnosis of why a replayed reward differs (the text before ':' groups the summary)."""
    if result.error is not None:
        return f"query fails here: {result.error[:120]}"
    if not isinstance(result.rows, list):
        return "no result set here"
    if Counter(map(str, result.rows)) == Counter(map(str, gold)):
        return "same rows as gold, other order: no total ORDER BY, MariaDB vs MySQL 8 row order"
    if recorded_observation is None:
        return "different rows"
    if recorded_observation.startswith("Error executing query"):
        return f"query failed when recorded: {recorded_observation[:120]}"
    shown = [str(row) for row in result.rows[:25]]
    if recorded_observation == str(result.rows[:25])[:350]:
        return "agent rows as recorded, gold result differs: MySQL 8 ordered, broke ties or rejected it otherwise"
    if len(recorded_observation) == len(str(result.rows[:25])) and all(row in recorded_observation for row in shown):
        return "agent rows as recorded in another order: no total ORDER BY, MariaDB vs MySQL 8 row order"
    return "agent rows differ from recorded: ties under ORDER BY ... LIMIT, or server semantics"


def _replay_episode(env: IntercodeSqlEnv, record: dict[str, Any], tolerance: float) -> Disagreement | None:
    """Replays one recorded episode; returns its first disagreement or None."""
    task = env.task(int(record["task_id"]))
    env.reset(task)
    history = record["turn_history"]
    style = _style(history)
    last = QueryResult()
    observations = history.get("observations", [])
    for turn, (action, recorded) in enumerate(zip(history["actions"], history["rewards"])):
        observation = observations[turn] if turn < len(observations) else None
        if style == "react":
            sql, is_code = parse_react_action(action)
            if is_code and sql != "submit":
                last = env.execute(sql)
                observation_of_last = observation
            scored = is_code and sql == "submit"
        else:
            if action == "blocked" or (observation is not None and RETRY_MARKER in observation):
                scored = False
            else:
                last, observation_of_last, scored = env.execute(action), observation, True
        replayed = intercode_reward(last.answer, env.gold_rows()) if scored else 0.0
        if abs(float(recorded or 0.0) - replayed) > tolerance:
            return Disagreement(
                task_id=task.id,
                turn=turn,
                recorded=float(recorded or 0.0),
                replayed=replayed,
                cause=_cause(last, env.gold_rows(), observation_of_last if scored else None),
                sql=action,
                gold=task.meta["gold"],
            )
    return None


def replay(
    recordings: str = str(DEFAULT_DATA_DIR / "gpt-3.5_react_10_turns.json"),
    db_url: str | None = None,
    limit: int | None = None,
    every: int = 1,
    data_dir: str = str(DEFAULT_DATA_DIR),
    tolerance: float = 0.01,
    show: int = 50,
    output: str | None = None,
) -> dict[str, Any]:
    """Replays recorded InterCode-SQL episodes and prints ``agreement: MATCHED/TOTAL`` as the last line.

    Each replayed episode's outcome is appended to ``output`` as it finishes; a rerun skips the episodes found there,
    so a replay stopped by a failing server (:class:`ReplayStopped`, which says why) resumes where it stopped.

    Args:
        recordings: InterCode log (JSON keyed by task id); default: the shared gpt-3.5 ReAct run (1034 episodes).
        db_url: server URL; default: start (or reuse) the local server with ``scripts/start_mysql.sh``.
        limit: replay only the first N episodes (after ``every``).
        every: replay every N-th episode: a sample spread over all databases.
        data_dir: folder with ``ic_spider_dev.json``.
        tolerance: largest reward difference that still agrees.
        show: how many disagreements to print in full (all are counted and returned).
        output: outcomes JSONL (resumed from); default ``runs/replay/<recordings file name>.jsonl``.

    Returns:
        matched, total (episodes that did not mutate their database), mutated, agreement, disagreements, causes.
    """
    episodes = [(line, record) for line, _, record in read_items(recordings)][::every][:limit]
    for line, record in episodes:
        for key in ("task_id", "turn_history"):
            if not isinstance(record, dict) or key not in record:
                raise DataError(recordings, line, key, "missing: not an InterCode recording")
    out = Path(output or Path("runs") / "replay" / f"{Path(recordings).stem}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {o["task_id"]: o for o in _read_outcomes(out) if o["tolerance"] == tolerance}
    url = db_url or start_server()
    disagreements: list[Disagreement] = []
    mutated: list[str] = []
    with IntercodeSqlEnv(db_url=url, data_dir=data_dir, max_turns=10**6) as env:
        for i, (_, record) in enumerate(tqdm(episodes, desc="replay", unit="episode")):
            tid = env.task(int(record["task_id"])).id
            outcome = done.get(tid)
            if outcome is None:
                try:
                    found = _replay_episode(env, record, tolerance)
                except EnvironmentCrashed as e:
                    raise ReplayStopped(f"replay stopped after {i} of {len(episodes)} episodes: {e}. The finished "
                                        f"ones are in {out}; run the same command again to resume") from None
                outcome = {"task_id": tid, "tolerance": tolerance, "mutated": env.mutated,
                           "disagreement": None if found is None else asdict(found)}
                append_jsonl(out, [outcome])
            if outcome["mutated"]:
                mutated.append(tid)
            elif outcome["disagreement"] is not None:
                disagreements.append(Disagreement(**outcome["disagreement"]))
    total = len(episodes) - len(mutated)
    matched = total - len(disagreements)
    causes = Counter(d.cause.split(":")[0] for d in disagreements)
    for d in disagreements[:show]:
        print(f"DISAGREE {d.task_id} turn {d.turn}: recorded {d.recorded:g}, replayed {d.replayed:g} -- {d.cause}")
        print(f"    action: {d.sql[:300]!r}\n    gold:   {d.gold[:300]!r}")
    if len(disagreements) > show:
        print(f"... {len(disagreements) - show} more disagreements")
    for cause, n in causes.most_common():
        print(f"disagreements by cause: {n} x {cause}")
    print(f"mutated the database (excluded): {len(mutated)}" + (f" {mutated[:20]}" if mutated else ""))
    print(f"agreement: {matched}/{total}")
    return {
        "matched": matched,
        "total": total,
        "mutated": len(mutated),
        "agreement": matched / total if total else 1.0,
        "disagreements": [asdict(d) for d in disagreements],
        "causes": dict(causes),
    }
