"""InterCode-SQL (github.com/princeton-nlp/intercode) on a real MySQL-compatible server, with isolated episodes.

Semantics follow InterCode's ``SqlEnv`` and its experiment drivers (``eval_react.py``, ``eval_n_turn.py``):
- actions: ``execute[<SQL>]`` or ``submit`` (ReAct, ``action_format="react"``), or raw SQL (multi-turn,
  ``action_format="sql"``); SQL is cut at the first ``;`` as InterCode's parsers do;
- observations: ``str`` of the result rows (a list of tuples), ``None`` for statements without a result set, or
  ``Error executing query: <server message>``; truncated to 350 characters (IPR/HPL);
- reward (``intercode_reward``): IoU of the multisets of ``str(row)`` between the agent's last result and the gold
  result, scaled by Kendall's tau-b between the orders of the shared rows and rounded to 2 decimals (unscaled when tau
  is undefined); ReAct scores only ``submit`` (the last executed result; auto-submitted at ``max_turns``), multi-turn
  scores every query and ends at reward 1. Success = reward 1.

Isolation. InterCode reset a Docker container; here every episode gets its own MySQL user (random name and password)
and a fresh connection, granted only SELECT on its task's database. Reads (the common case) run on the shared database
directly, so an episode costs a CREATE USER and a connection (a few ms). The first statement that the server refuses
for lack of privileges (DROP, DELETE, UPDATE, CREATE, ...) makes the episode copy its database into a private scratch
schema (``SHOW CREATE TABLE`` + ``INSERT ... SELECT``, keeping keys and foreign keys), get all privileges there, switch
to it and retry the statement: the agent can change its copy at will, and the episode is flagged ``mutated``. The
copy and the user are dropped when the episode ends. Isolation rests on the server's privilege checks, not on parsing
SQL: a statement can never reach another database (``USE other_db`` is refused) nor change the shared one. The gold
query runs once per task on the pristine database, so an agent cannot raise its reward by deleting rows (in InterCode
an agent that emptied a table and returned nothing scored 1).

Limits. The agent's account cannot loosen them, whatever it sets for its session (MariaDB 10.11 lets any user
``SET SESSION max_statement_time = 0`` or ``SET STATEMENT max_statement_time = 0 FOR ...``, and a per-user
``MAX_STATEMENT_TIME`` resource limit is only that variable's default, checked): a watchdog on the admin connection
sends ``KILL QUERY`` when a statement outlives ``statement_timeout_s``; the agent sees the server's own time-limit
message. Results are streamed (an unbuffered cursor), never buffered whole: a result is cut after ``MAX_RESULT_ROWS``
rows or ``MAX_RESULT_BYTES`` on the wire, its statement killed on the server, and the observation says so. A row too
large to read (``SELECT REPEAT('x', 15000000), ...`` makes rows of hundreds of MB) is not read whole: the session is
killed and reopened (temporary tables, variables and an open transaction are lost; the observation says so). A cut
result scores 0. InterCode's reward for it would be below ``len(gold) / MAX_RESULT_ROWS`` (IoU) when cut for rows:
below 0.005 for every gold result under 500 rows, 0 after InterCode's rounding (Spider dev's largest gold result has
1860 rows); a cut for bytes needs a result 150 times the largest gold result's text (28 KB).

Locks. One episode's locks never block another: copies read the shared tables with non-locking consistent reads
(READ COMMITTED), gold queries are plain reads, and an agent's own locking read of a row another agent locked waits
at most the statement limit. The episode's server threads are killed (``KILL USER``) when it ends, so ``close()``
leaves none running.

Failures. A lost connection or a server that is down or restarting (client errors 2xxx, server shutdown, killed
connection) raises ``EnvironmentCrashed``: the episode's state is gone, so its reward is unknown and never guessed.
``reset`` waits up to ``connect_timeout_s`` for a server that is (re)starting, since no episode state exists yet.

The server: ``scripts/start_mysql.sh`` (MariaDB, ``lower_case_table_names=1`` as InterCode's MySQL 8 container; the
sql_mode is MySQL 8's without ONLY_FULL_GROUP_BY, see ``SQL_MODE``). MariaDB may order rows of queries without a
total ORDER BY differently from MySQL 8 (e.g. it sorts GROUP BY output); ``hpl_lightning.envs.intercode_replay``
reports where that changes a recorded reward.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence
from urllib.parse import parse_qs, unquote, urlparse

import pymysql
import pymysql.connections
import pymysql.cursors
import pymysql.err

from hpl_lightning.envs.base import Environment, EnvironmentCrashed, StepResult, Task
from hpl_lightning.errors import UsageError

BENCHMARK = "intercode_sql"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "intercode_sql"
DEFAULT_DB_URL = "mysql://admin:admin@127.0.0.1:3307"
# MySQL 8's default sql_mode without ONLY_FULL_GROUP_BY, set per session. MariaDB's ONLY_FULL_GROUP_BY ignores
# functional dependencies, so it rejects queries MySQL 8 accepts (`SELECT t2.name ... GROUP BY t1.id` with t1.id =
# t2.id, 8+ Spider gold queries among them). Replaying the 1034 recorded ReAct episodes agrees on 971 with it and on
# 1001 without it, so the remaining difference (MySQL 8 rejects a few such queries that MariaDB now runs) is smaller.
SQL_MODE = "STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION"
OBSERVATION_CHARS = 350
# Bounds on one statement's result in this process (see "Limits" above); Spider dev's largest gold result is 1860 rows.
MAX_RESULT_ROWS = 100_000
MAX_RESULT_BYTES = 4 * 2**20
# What the server may still send after a cut (socket buffers) before its KILL QUERY lands; reading past
# MAX_RESULT_BYTES + this (one huge row, or a drain that does not end) abandons the session instead.
_IN_FLIGHT_BYTES = 32 * 2**20
# The server's own message for a statement over max_statement_time; a watchdog kill reads the same to the agent.
TIME_LIMIT_MESSAGE = "Query execution was interrupted (max_statement_time exceeded)"
_QUERY_INTERRUPTED, _STATEMENT_TIMEOUT = 1317, 1969
NO_CODE_OBSERVATION = "Error executing query: Your last `execute` action did not contain sql code"
# Client-side connection errors (2xxx) and server errors that mean the session is gone, not that the SQL was wrong.
_CONNECTION_LOST_SERVER_ERRORS = {1053, 1152, 1184, 1927, 4031}  # shutdown, aborted, killed, idle-disconnected
# Privilege errors that send an episode from the shared database to its own copy (then the statement is retried).
_PRIVILEGE_ERRORS = {1044, 1142, 1143, 1227, 1370}

INSTRUCTION = """\
You are a helpful assistant that answers questions by querying a MySQL database. The database for the question \
is already selected; you can inspect it (SHOW TABLES, DESCRIBE <table>) and run any SQL query.

At every turn, think briefly and then give exactly one action, in this form:
Thought: <your reasoning>
Action: <one action>

Actions:
- execute[<SQL>]: run one SQL statement; the observation is the result rows or the error message
- submit: finish; your answer is the result of the last query you executed

The answer is compared with the result of a reference query, so make your last query return exactly the rows the \
question asks for (no extra columns), in the order the question asks for."""

INSTRUCTION_SQL = """\
You are a helpful assistant that answers questions by querying a MySQL database. The database for the question \
is already selected.

At every turn, think briefly and then write exactly one SQL statement, in this form:
Thought: <your reasoning>
Action: <one SQL statement>

Each statement's result rows (or error message) come back as the observation, and each result is compared with \
the result of a reference query: the episode ends when they match."""

Rows = list[tuple[Any, ...]]


# ---------------------------------------------------------------------------------------------------------- reward
def kendall_tau_b(x: Sequence[Any], y: Sequence[Any]) -> float:
    """Kendall's tau-b of two equally long sequences, exactly as ``scipy.stats.kendalltau`` computes it (nan when
    undefined: fewer than 2 items or one sequence constant). O(n log n), so large results stay cheap."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"sequences differ in length: {n} != {len(y)}")
    rank_x, rank_y = _dense_ranks(x), _dense_ranks(y)
    tot = n * (n - 1) // 2
    xtie, ytie = _tied_pairs(Counter(rank_x)), _tied_pairs(Counter(rank_y))
    if xtie == tot or ytie == tot:
        return math.nan
    pairs = sorted(zip(rank_x, rank_y))
    ntie = _tied_pairs(Counter(pairs))
    # Discordant pairs: x strictly increasing while y decreases; a Fenwick tree counts earlier items with larger y.
    tree = [0] * (max(rank_y) + 1)
    dis = inserted = start = 0
    while start < n:
        end = start
        while end < n and pairs[end][0] == pairs[start][0]:
            end += 1
        for _, ry in pairs[start:end]:
            i, not_above = ry, 0
            while i > 0:
                not_above += tree[i]
                i -= i & -i
            dis += inserted - not_above
        for _, ry in pairs[start:end]:
            i = ry
            while i < len(tree):
                tree[i] += 1
                i += i & -i
            inserted += 1
        start = end
    con_minus_dis = tot - xtie - ytie + ntie - 2 * dis
    tau = con_minus_dis / math.sqrt(tot - xtie) / math.sqrt(tot - ytie)
    return min(1.0, max(-1.0, tau))


def _dense_ranks(values: Sequence[Any]) -> list[int]:
    order = {v: i + 1 for i, v in enumerate(sorted(set(values)))}
    return [order[v] for v in values]


def _tied_pairs(counts: Counter) -> int:
    return sum(c * (c - 1) // 2 for c in counts.values())


def _intersect_in_order(items: list[str], intersection: Counter) -> list[str]:
    """The items that belong to the multiset intersection, in their original order (InterCode's helper)."""
    left, kept = intersection.copy(), []
    for item in items:
        if left[item] > 0:
            left[item] -= 1
            kept.append(item)
    return kept


def intercode_reward(agent: Rows | None | str, gold: Rows) -> float:
    """InterCode-SQL's reward for the agent's result: 0 unless it is a result set; IoU of the multisets of
    ``str(row)``; 1 if both are empty; otherwise scaled by Kendall's tau-b of the shared rows' orders, rounded to
    2 decimals (left unscaled and unrounded when tau is undefined, as InterCode does)."""
    if not isinstance(agent, list):
        return 0.0
    list_agent, list_gold = [str(r) for r in agent], [str(r) for r in gold]
    dist_agent, dist_gold = Counter(list_agent), Counter(list_gold)
    union = dist_agent | dist_gold
    if not union:
        return 1.0
    intersection = dist_agent & dist_gold
    reward = sum(intersection.values()) * 1.0 / sum(union.values())
    if intersection:
        tau = kendall_tau_b(_intersect_in_order(list_agent, intersection), _intersect_in_order(list_gold, intersection))
        if not math.isnan(tau):
            reward = round(tau * reward, 2)
    return reward


# ---------------------------------------------------------------------------------------------------------- actions
def parse_react_action(action: str) -> tuple[str, bool]:
    """InterCode's ReAct parser: ``submit``, or the SQL inside ``execute[...]`` cut at the first ``;``.

    Returns (action, is_code); is_code False means the agent wrote no executable action."""
    if action == "submit":
        return action, True
    matches = re.findall(r"execute\[(.*)\]", action, re.DOTALL)
    if not matches:
        return action, False
    return _up_to_semicolon(matches[0]), True


def _up_to_semicolon(sql: str) -> str:
    return sql[: sql.index(";")] if ";" in sql else sql


@dataclass(frozen=True)
class QueryResult:
    """What one statement produced: result rows, no result set (``rows`` None), or the server's error message.

    ``cut`` says why ``rows`` is only the start of a larger result (see ``MAX_RESULT_ROWS``); such a result scores 0."""

    rows: Rows | None = None
    error: str | None = None
    cut: str | None = None

    @property
    def answer(self) -> Rows | None | str:
        """The value InterCode scores: rows, None, or a string (an error or a cut result), which scores 0."""
        if self.cut is not None:
            return f"result cut: {self.cut}"
        return self.observation_value if self.error is not None else self.rows

    @property
    def observation_value(self) -> Rows | None | str:
        return f"Error executing query: {self.error}" if self.error is not None else self.rows

    def observation(self, limit: int | None = OBSERVATION_CHARS) -> str:
        text = str(self.observation_value)
        text = text if limit is None else text[:limit]
        return text if self.cut is None else f"{text}\n[result cut: {self.cut}]"


# ---------------------------------------------------------------------------------------------------------- server
@dataclass(frozen=True)
class DbUrl:
    """``mysql://user:password@host:port[?unix_socket=/path][&ssl=true]`` (``mysql+pymysql://`` also accepted).

    TLS is off unless asked for: the server is normally local, and a TLS context costs ~30 ms per connection."""

    host: str = "127.0.0.1"
    port: int = 3307
    user: str = "admin"
    password: str = "admin"
    unix_socket: str | None = None
    ssl: bool = False

    @classmethod
    def parse(cls, url: str) -> "DbUrl":
        parsed = urlparse(url)
        if parsed.scheme not in ("mysql", "mysql+pymysql", "mariadb"):
            raise ValueError(f"not a MySQL URL: {url!r} (expected mysql://user:password@host:port)")
        query = parse_qs(parsed.query)
        return cls(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 3306,
            user=unquote(parsed.username or "root"),
            password=unquote(parsed.password or ""),
            unix_socket=query.get("unix_socket", [None])[0],
            ssl=query.get("ssl", ["false"])[0].lower() in ("1", "true", "yes"),
        )


def _error_code(error: Exception) -> int | None:
    return error.args[0] if error.args and isinstance(error.args[0], int) else None


def _is_connection_error(error: Exception) -> bool:
    """Whether the session is gone (as opposed to the statement being wrong)."""
    if isinstance(error, (pymysql.err.InterfaceError, OSError)):
        return True
    code = _error_code(error)
    return code is not None and (2000 <= code < 3000 or code in _CONNECTION_LOST_SERVER_ERRORS)


def _close_quietly(connection: pymysql.connections.Connection) -> None:
    """Closes a connection that may already be broken or closed."""
    try:
        connection.close()
    except (pymysql.err.Error, OSError):
        pass


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class _ResultTooLarge(Exception):
    """The server sent more of one statement's result than ``_MeteredConnection.hard_limit`` allows."""


class _MeteredConnection(pymysql.connections.Connection):
    """A connection that counts the bytes it receives (``received``, reset per statement by its user) and refuses to
    read past ``hard_limit``. pymysql reads a row whole, and one row can be hundreds of MB, so the bound has to act
    below rows; after ``_ResultTooLarge`` the connection is mid-packet and must be abandoned (``_abandon``)."""

    received: int = 0
    hard_limit: int | None = None

    def _read_bytes(self, num_bytes: int) -> bytes:
        if self.hard_limit is not None and self.received + num_bytes > self.hard_limit:
            raise _ResultTooLarge(f"more than {self.hard_limit} bytes")
        self.received += num_bytes
        return super()._read_bytes(num_bytes)


def _abandon(connection: pymysql.connections.Connection) -> None:
    """Closes a connection left mid-result, so that pymysql does not try to read the rest of it when collected."""
    result = getattr(connection, "_result", None)
    if result is not None:
        result.unbuffered_active = False
    _close_quietly(connection)


@dataclass
class _Episode:
    """The per-episode server resources and state; ``scratch`` is set once the episode got its own copy."""

    task: Task
    gold: Rows
    user: str
    password: str
    host: str
    connection: _MeteredConnection
    scratch: str | None = None
    mutated: bool = False  # a write succeeded in the scratch copy
    turns: int = 0
    last: QueryResult = field(default_factory=QueryResult)  # InterCode starts from a `use db` (no result set)
    done: bool = False


class IntercodeSqlEnv(Environment):
    """InterCode-SQL tasks (Spider dev, 1034) on a MySQL-compatible server; one isolated episode at a time.

    ``db_url`` must name an account that may create users and grant privileges (``scripts/start_mysql.sh`` sets up
    ``admin`` so). Build one env per concurrent episode (e.g. with ``EnvPool``); they never see each other's changes.
    """

    benchmark = BENCHMARK

    def __init__(
        self,
        db_url: str = DEFAULT_DB_URL,
        data_dir: str | Path = DEFAULT_DATA_DIR,
        action_format: Literal["react", "sql"] = "react",
        max_turns: int = 10,
        statement_timeout_s: float = 30.0,
        connect_timeout_s: float = 30.0,
        sql_mode: str | None = SQL_MODE,
    ):
        if action_format not in ("react", "sql"):
            raise ValueError(f"action_format must be 'react' or 'sql', got {action_format!r}")
        self.url = DbUrl.parse(db_url)
        self.data_dir = Path(data_dir)
        self.action_format = action_format
        self.max_turns = max_turns
        self.instruction = INSTRUCTION if action_format == "react" else INSTRUCTION_SQL
        self.statement_timeout_s = statement_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.sql_mode = sql_mode
        self._records: list[dict[str, Any]] | None = None
        self._admin: pymysql.connections.Connection | None = None
        self._gold: dict[tuple[str, str], Rows] = {}
        self._schemas: dict[str, list[tuple[str, str]]] = {}  # db -> (table, CREATE TABLE), for scratch copies
        self._episode: _Episode | None = None
        self._leftovers: list[tuple[str, str, str | None]] = []  # (user, host, scratch) not yet dropped

    # ------------------------------------------------------------------------------------------------------ tasks
    def records(self) -> list[dict[str, Any]]:
        if self._records is None:
            path = self.data_dir / "ic_spider_dev.json"
            if not path.is_file():
                raise FileNotFoundError(f"InterCode-SQL tasks not found at {path} (see shared/data/README.md)")
            self._records = json.loads(path.read_text())
        return self._records

    def task(self, index: int) -> Task:
        record = self.records()[index]
        meta = {"index": index, "db": record["db"], "gold": record["gold"], "hardness": record.get("hardness")}
        return Task(id=f"{BENCHMARK}/{index}", description=record["query"], meta=meta)

    def tasks(self, split: str) -> list[Task]:
        """'test': IPR/HPL's 200 test tasks (``ipr_test_indices.json``); 'train': the other 834; 'all': 1034."""
        n = len(self.records())
        test = json.loads((self.data_dir / "ipr_test_indices.json").read_text())
        indices = {"test": sorted(test), "train": sorted(set(range(n)) - set(test)), "all": list(range(n))}
        if split not in indices:
            raise UsageError(f"unknown split {split!r}; expected one of {sorted(indices)}")
        return [self.task(i) for i in indices[split]]

    # ------------------------------------------------------------------------------------------------------ episode
    @property
    def mutated(self) -> bool:
        """Whether the current episode changed its database (its private copy)."""
        return self._episode is not None and self._episode.mutated

    def reset(self, task: Task) -> str:
        self._end_episode()
        db, gold_sql = task.meta["db"], task.meta["gold"]
        admin = self._admin_connection()
        try:
            gold = self._gold_rows(admin, db, gold_sql)
            user, password = f"hplep_{secrets.token_hex(8)}", secrets.token_hex(16)
            host = self._client_host(admin)
            self._leftovers.append((user, host, None))  # dropped at the next reset/close even if we fail below
            with admin.cursor() as cur:
                cur.execute(f"CREATE USER {_quote(user)}@{_quote(host)} IDENTIFIED BY %s", (password,))
                cur.execute(f"GRANT SELECT, SHOW VIEW ON {_quote(db)}.* TO {_quote(user)}@{_quote(host)}")
            connection = self._connect(user, password, db)
        except pymysql.err.MySQLError as e:
            if _is_connection_error(e):
                raise self._crash("preparing the episode", e) from e
            raise RuntimeError(
                f"cannot prepare an isolated episode as {self.url.user!r}: {e}. The db_url account needs CREATE USER "
                "and GRANT OPTION (scripts/start_mysql.sh grants them to admin)"
            ) from e
        self._leftovers.pop()
        self._episode = _Episode(task=task, gold=gold, user=user, password=password, host=host, connection=connection)
        return ""

    def step(self, action: str) -> StepResult:
        ep = self._episode
        if ep is None or ep.done:
            raise RuntimeError("step() without an active episode; call reset(task) first")
        ep.turns += 1
        info: dict[str, Any] = {"valid": True}
        if self.action_format == "react":
            sql, is_code = parse_react_action(action.strip())
            info["valid"] = is_code  # neither execute[...] nor submit: the agent is told how to write an action
            if not is_code:
                observation, reward, done = NO_CODE_OBSERVATION, 0.0, False
            elif sql == "submit":
                observation, reward, done = ep.last.observation(), self._score(ep.last), True
            else:
                ep.last = self._execute(ep, sql)
                observation, reward, done = ep.last.observation(), 0.0, False
            if not done and ep.turns >= self.max_turns:  # InterCode submits for the agent at the turn limit
                reward, done, info["auto_submit"] = self._score(ep.last), True, True
        else:
            sql = _up_to_semicolon(action.strip())
            if sql == "submit":
                observation, reward, done = ep.last.observation(), self._score(ep.last), True
            else:
                ep.last = self._execute(ep, sql)
                reward = self._score(ep.last)
                observation, done = ep.last.observation(), reward == 1 or ep.turns >= self.max_turns
        ep.done = done
        info.update(success=done and reward == 1, mutated=ep.mutated, executed_error=ep.last.error)
        return StepResult(observation=observation, reward=reward, done=done, info=info)

    def execute(self, sql: str) -> QueryResult:
        """Runs one statement in the current episode without counting a turn (replay and diagnostics)."""
        if self._episode is None:
            raise RuntimeError("no active episode; call reset(task) first")
        return self._execute(self._episode, sql)

    def gold_rows(self) -> Rows:
        if self._episode is None:
            raise RuntimeError("no active episode; call reset(task) first")
        return self._episode.gold

    def close(self) -> None:
        self._end_episode()
        if self._leftovers and self._admin is None:  # after a crash: one quick try; a dead server keeps them
            try:
                self._admin_connection(wait=False)
            except EnvironmentCrashed:
                pass
        if self._admin is not None:
            _close_quietly(self._admin)
            self._admin = None

    # ------------------------------------------------------------------------------------------------------ internals
    def _score(self, result: QueryResult) -> float:
        assert self._episode is not None
        return intercode_reward(result.answer, self._episode.gold)

    def _execute(self, ep: _Episode, sql: str) -> QueryResult:
        """Runs the agent's statement; on a privilege error in the shared database, moves to a copy and retries."""
        if ep.scratch is not None:
            sql = self._redirect_use(ep, sql)
        for _ in range(2):
            try:
                result = self._run_bounded(ep, sql)
                ep.mutated = ep.mutated or (ep.scratch is not None and self._may_write(sql))
                return result
            except pymysql.err.MySQLError as e:
                if _is_connection_error(e):
                    raise self._crash("running the agent's query", e) from e
                if ep.scratch is None and _error_code(e) in _PRIVILEGE_ERRORS and self._may_write(sql):
                    self._move_to_scratch(ep)
                    sql = self._redirect_use(ep, sql)
                    continue
                return QueryResult(error=str(e.args[1]) if len(e.args) > 1 else str(e))
        raise AssertionError("unreachable: the retry in the scratch copy returns")

    def _run_bounded(self, ep: _Episode, sql: str) -> QueryResult:
        """Runs one statement of the agent's within the time limit (a watchdog sends ``KILL QUERY`` from the admin
        connection, whatever the agent set for its session) and streams its rows, cut at the result bounds."""
        connection, thread_id = ep.connection, ep.connection.thread_id()
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            try:
                self._kill(f"KILL QUERY {thread_id}")
            except (pymysql.err.MySQLError, OSError):
                pass  # the admin connection is gone too: the episode's next call finds out

        watchdog = threading.Timer(self.statement_timeout_s, kill)
        watchdog.daemon = True

        def stop_watchdog() -> None:  # before anything else uses the admin connection
            watchdog.cancel()
            watchdog.join()

        rows: Rows = []
        cut = None
        connection.received, connection.hard_limit = 0, MAX_RESULT_BYTES + _IN_FLIGHT_BYTES
        watchdog.start()
        cur = connection.cursor(pymysql.cursors.SSCursor)
        try:
            cur.execute(sql)
            if cur.description is None:
                cur.close()
                return QueryResult()
            for row in iter(cur.fetchone, None):
                if len(rows) == MAX_RESULT_ROWS or connection.received > MAX_RESULT_BYTES:
                    cut = (f"more than {MAX_RESULT_ROWS} rows" if len(rows) == MAX_RESULT_ROWS
                           else f"more than {MAX_RESULT_BYTES // 2**20} MiB") + "; the statement was stopped"
                    stop_watchdog()
                    self._kill(f"KILL QUERY {thread_id}")  # the server stops sending the rest
                    break
                rows.append(row)
            try:
                cur.close()  # reads what is still in flight
            except pymysql.err.MySQLError as e:
                if cut is None or _error_code(e) not in (_QUERY_INTERRUPTED, _STATEMENT_TIMEOUT):
                    raise
            return QueryResult(rows=rows, cut=cut)
        except _ResultTooLarge:
            stop_watchdog()
            cur.connection = None  # nothing more is read from this connection
            self._reopen_session(ep)
            limit_mib = (MAX_RESULT_BYTES + _IN_FLIGHT_BYTES) // 2**20
            return QueryResult(rows=rows, cut=f"more than {limit_mib} MiB; the statement was stopped and the session "
                               "restarted (temporary tables, variables and an open transaction are gone)")
        except pymysql.err.MySQLError as e:
            stop_watchdog()
            if timed_out.is_set() and _error_code(e) == _QUERY_INTERRUPTED:
                raise pymysql.err.OperationalError(_STATEMENT_TIMEOUT, TIME_LIMIT_MESSAGE) from e
            raise
        finally:
            stop_watchdog()
            connection.hard_limit = None

    def _kill(self, statement: str) -> None:
        """``KILL ...`` on the admin connection; a thread or query that is already gone is not an error."""
        if self._admin is None:
            return
        try:
            with self._admin.cursor() as cur:
                cur.execute(statement)
        except pymysql.err.MySQLError as e:
            if _error_code(e) != 1094:  # unknown thread id
                raise

    def _reopen_session(self, ep: _Episode) -> None:
        """Replaces the episode's connection (abandoned mid-result) by a fresh one in the same database."""
        thread_id = ep.connection.thread_id()
        _abandon(ep.connection)
        self._kill(f"KILL CONNECTION {thread_id}")
        ep.connection = self._connect(ep.user, ep.password, ep.scratch or ep.task.meta["db"])

    @staticmethod
    def _may_write(sql: str) -> bool:
        """Whether a refused statement may be a write worth retrying in a private copy (reads, USE and SET that are
        refused would be refused there too, so they need no copy)."""
        head = re.sub(r"^(\s|/\*.*?\*/|\()+", "", sql, flags=re.DOTALL).split(None, 1)
        return not head or head[0].lower() not in {"select", "show", "desc", "describe", "explain", "use", "set"}

    @staticmethod
    def _redirect_use(ep: _Episode, sql: str) -> str:
        """``USE <task db>`` means the episode's copy once it has one."""
        match = re.fullmatch(r"\s*use\s+`?([\w$]+)`?\s*", sql, flags=re.IGNORECASE)
        if match and match.group(1).lower() == ep.task.meta["db"].lower() and ep.scratch is not None:
            return f"USE {_quote(ep.scratch)}"
        return sql

    def _move_to_scratch(self, ep: _Episode) -> None:
        """Copies the task's database into a private schema, grants the episode's user all of it and switches."""
        db = ep.task.meta["db"]
        scratch = f"{ep.user}_db"  # user names are random, so is the schema
        admin = self._admin_connection()
        self._leftovers.append((ep.user, ep.host, scratch))
        try:
            with admin.cursor() as cur:
                # Consistent non-locking reads of the shared tables: an agent's `SELECT ... FOR UPDATE` in an open
                # transaction (another episode) would block INSERT ... SELECT under REPEATABLE READ.
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                cur.execute(
                    "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA "
                    "WHERE SCHEMA_NAME = %s",
                    (db,),
                )
                charset, collation = cur.fetchone()
                cur.execute(f"CREATE DATABASE {_quote(scratch)} CHARACTER SET {charset} COLLATE {collation}")
                cur.execute(f"USE {_quote(scratch)}")
                cur.execute("SET FOREIGN_KEY_CHECKS = 0")
                for table, create in self._create_statements(cur, db):
                    cur.execute(create)
                    cur.execute(f"INSERT INTO {_quote(table)} SELECT * FROM {_quote(db)}.{_quote(table)}")
                cur.execute("SET FOREIGN_KEY_CHECKS = 1")
                cur.execute(
                    "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, REFERENCES, "
                    "CREATE TEMPORARY TABLES, LOCK TABLES, CREATE VIEW, SHOW VIEW "
                    f"ON {_quote(scratch)}.* TO {_quote(ep.user)}@{_quote(ep.host)}"
                )
            with ep.connection.cursor() as cur:
                cur.execute(f"USE {_quote(scratch)}")
        except pymysql.err.MySQLError as e:
            raise self._crash("copying the task's database", e) from e
        self._leftovers.pop()
        ep.scratch = scratch

    def _create_statements(self, cur: Any, db: str) -> list[tuple[str, str]]:
        if db not in self._schemas:
            cur.execute(
                "SELECT TABLE_NAME FROM information_schema.TABLES "
                "WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE'",
                (db,),
            )
            tables = [row[0] for row in cur.fetchall()]
            statements = []
            for table in tables:
                cur.execute(f"SHOW CREATE TABLE {_quote(db)}.{_quote(table)}")
                statements.append((table, cur.fetchone()[1]))
            self._schemas[db] = statements
        return self._schemas[db]

    def _gold_rows(self, admin: pymysql.connections.Connection, db: str, gold_sql: str) -> Rows:
        """The gold result on the pristine database, cached. A gold query that fails scores against [] (InterCode)."""
        key = (db, gold_sql)
        if key not in self._gold:
            with admin.cursor() as cur:
                cur.execute(f"USE {_quote(db)}")
                try:
                    cur.execute(gold_sql)
                    self._gold[key] = list(cur.fetchall()) if cur.description is not None else []
                except pymysql.err.MySQLError as e:
                    if _is_connection_error(e):
                        raise
                    self._gold[key] = []
        return self._gold[key]

    def _connect(self, user: str, password: str, database: str | None) -> _MeteredConnection:
        connection = _MeteredConnection(
            host=self.url.host,
            port=self.url.port,
            unix_socket=self.url.unix_socket,
            user=user,
            password=password,
            database=database,
            charset="utf8mb4",
            autocommit=True,
            ssl_disabled=not self.url.ssl,
            connect_timeout=10,
            read_timeout=int(self.statement_timeout_s) + 30,  # a hung server becomes a connection error
            write_timeout=int(self.statement_timeout_s) + 30,
        )
        with connection.cursor() as cur:
            if self.sql_mode is not None:
                cur.execute("SET SESSION sql_mode = %s", (self.sql_mode,))
            try:  # MariaDB: seconds; MySQL 8: milliseconds (SELECT only)
                cur.execute("SET SESSION max_statement_time = %s", (self.statement_timeout_s,))
            except pymysql.err.OperationalError:
                cur.execute("SET SESSION max_execution_time = %s", (int(self.statement_timeout_s * 1000),))
        return connection

    def _admin_connection(self, wait: bool = True) -> pymysql.connections.Connection:
        """The connection that manages users, copies and gold queries; reconnects (waiting up to
        ``connect_timeout_s`` if ``wait``) while no episode depends on it, then drops what crashed episodes left."""
        if self._admin is not None:
            try:
                self._admin.ping(reconnect=False)
                return self._admin
            except pymysql.err.MySQLError:
                _close_quietly(self._admin)
                self._admin = None
        deadline = time.monotonic() + (self.connect_timeout_s if wait else 0.0)
        while True:
            try:
                self._admin = self._connect(self.url.user, self.url.password, None)
                break
            except pymysql.err.MySQLError as e:
                if not _is_connection_error(e) or time.monotonic() >= deadline:
                    raise EnvironmentCrashed(
                        f"cannot connect to the SQL server at {self.url.host}:{self.url.port} as {self.url.user} "
                        f"({e}); start it with scripts/start_mysql.sh or pass another db_url"
                    ) from e
                time.sleep(0.5)
        self._drop_leftovers()
        return self._admin

    def _client_host(self, admin: pymysql.connections.Connection) -> str:
        """The host part under which the server sees us, so the episode's user matches only this client."""
        with admin.cursor() as cur:
            cur.execute("SELECT USER()")
            return cur.fetchone()[0].rsplit("@", 1)[1]

    def _end_episode(self) -> None:
        ep, self._episode = self._episode, None
        if ep is None:
            return
        _abandon(ep.connection)
        self._leftovers.append((ep.user, ep.host, ep.scratch))
        if self._admin is not None:
            self._drop_leftovers()

    def _drop_leftovers(self) -> None:
        """Ends episode users' server threads (a statement may still run there) and drops the users and copies; kept
        for later when the server is unreachable."""
        assert self._admin is not None
        remaining = []
        for user, host, scratch in self._leftovers:
            try:
                with self._admin.cursor() as cur:
                    cur.execute(f"KILL USER {_quote(user)}@{_quote(host)}")
                    if scratch is not None:
                        cur.execute(f"DROP DATABASE IF EXISTS {_quote(scratch)}")
                    cur.execute(f"DROP USER IF EXISTS {_quote(user)}@{_quote(host)}")
            except pymysql.err.MySQLError:
                remaining.append((user, host, scratch))
        self._leftovers = remaining

    def _crash(self, doing: str, error: Exception) -> EnvironmentCrashed:
        """Ends the episode (its server state is lost or unusable) and describes why."""
        ep, self._episode = self._episode, None
        if ep is not None:
            _abandon(ep.connection)
            self._leftovers.append((ep.user, ep.host, ep.scratch))
        if self._admin is not None:
            _close_quietly(self._admin)
            self._admin = None
        return EnvironmentCrashed(f"SQL server failed while {doing}: {error}")
