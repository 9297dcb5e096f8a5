"""InterCode-SQL: InterCode's reward (pure), replay fidelity, episode isolation, and a server that goes away."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pymysql
import pytest

from hpl_lightning.envs.base import EnvironmentCrashed
from hpl_lightning.envs.intercode_replay import replay
from hpl_lightning.envs.intercode_sql import (
    DEFAULT_DATA_DIR,
    NO_CODE_OBSERVATION,
    TIME_LIMIT_MESSAGE,
    DbUrl,
    IntercodeSqlEnv,
    intercode_reward,
    kendall_tau_b,
    parse_react_action,
)
from tests.private_mysql import server_script

REPO = Path(__file__).resolve().parents[1]
RECORDINGS = DEFAULT_DATA_DIR / "gpt-3.5_react_10_turns.json"
POKER = 0  # task 0: db poker_player (tables people, poker_player; poker_player references people)


# ------------------------------------------------------------------------------------------------ reward (pure)
@pytest.mark.parametrize(
    ("agent", "gold", "expected"),
    [
        ([(1, "a"), (2, "b")], [(1, "a"), (2, "b")], 1.0),  # same rows, same order
        ([], [], 1.0),  # both empty
        ([(2,), (1,)], [(1,), (2,)], -1.0),  # reversed order: tau -1 scales the IoU of 1
        ([(1,), (2,)], [(1,), (2,), (3,)], 0.67),  # IoU 2/3, order agrees, rounded
        ([(1,), (3,), (2,)], [(1,), (2,), (3,)], 0.33),  # IoU 1, tau 1/3
        ([(1,), (1,)], [(1,)], 0.5),  # multisets: IoU 1/2; one shared row, tau undefined: unscaled
        ([(1,), (9,)], [(1,), (7,), (8,)], 0.25),  # one shared row: IoU 1/4 unscaled
        ([(1,)], [(1,), (2,), (3,)], 1 / 3),  # tau undefined: IoU neither scaled nor rounded
        ([(1,)], [("1",)], 0.0),  # rows compare as str(row): 1 != '1'
        ([], [(1,)], 0.0),
        (None, [], 0.0),  # a statement without a result set scores 0, even against an empty gold
        ("Error executing query: boom", [], 0.0),
    ],
)
def test_intercode_reward(agent: object, gold: list, expected: float) -> None:
    assert intercode_reward(agent, gold) == pytest.approx(expected)  # type: ignore[arg-type]


def test_kendall_tau_b_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(200):
        n, k = rng.randint(2, 40), rng.randint(1, 10)
        x = [str(rng.randint(0, k)) for _ in range(n)]
        y = x[:]
        rng.shuffle(y)
        ours, theirs = kendall_tau_b(x, y), stats.kendalltau(x, y).statistic
        assert (math.isnan(ours) and math.isnan(theirs)) or ours == theirs


def test_parse_react_action() -> None:
    assert parse_react_action("submit") == ("submit", True)
    assert parse_react_action("execute[SELECT 1; DROP TABLE t]") == ("SELECT 1", True)
    assert parse_react_action("execute[SELECT a\nFROM t]") == ("SELECT a\nFROM t", True)
    assert parse_react_action("execute[SELECT a FROM t WHERE x IN (SELECT") == (
        "execute[SELECT a FROM t WHERE x IN (SELECT", False)
    assert parse_react_action("SHOW TABLES")[1] is False


def test_db_url() -> None:
    url = DbUrl.parse("mysql://ad%40min:p%3Ass@db.local:3310?unix_socket=/tmp/s.sock&ssl=true")
    assert (url.user, url.password, url.host, url.port, url.unix_socket, url.ssl) == (
        "ad@min", "p:ss", "db.local", 3310, "/tmp/s.sock", True)
    with pytest.raises(ValueError):
        DbUrl.parse("postgres://x@y")


def test_splits() -> None:
    env = IntercodeSqlEnv()  # no server needed for tasks
    test, train = env.tasks("test"), env.tasks("train")
    assert len(test) == 200 and len(train) == 834
    assert test[0].id == "intercode_sql/0" and test[0].meta["db"] == "poker_player"
    assert {t.id for t in test}.isdisjoint(t.id for t in train)


# ------------------------------------------------------------------------------------------------ with a server
def admin_rows(url: str, db: str, sql: str) -> list[tuple]:
    """Reads the shared database directly, bypassing the environment."""
    u = DbUrl.parse(url)
    connection = pymysql.connect(host=u.host, port=u.port, user=u.user, password=u.password, database=db)
    try:
        with connection.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        connection.close()


@pytest.fixture
def env(mysql_url: str) -> Iterator[IntercodeSqlEnv]:
    with IntercodeSqlEnv(db_url=mysql_url) as e:
        yield e  # type: ignore[misc]


@pytest.mark.mysql
def test_react_episode(env: IntercodeSqlEnv) -> None:
    task = env.task(POKER)
    assert env.reset(task) == ""
    assert env.step("execute[SELECT name FROM poker_players]").observation.startswith("Error executing query: Table")
    step = env.step("I think I should look at the tables")
    assert step.observation == NO_CODE_OBSERVATION and not step.done
    assert env.step("execute[SHOW TABLES]").observation == "[('people',), ('poker_player',)]"
    assert env.step(f"execute[{task.meta['gold']};]").reward == 0  # only submit is scored
    final = env.step("submit")
    assert final.done and final.reward == 1 and final.info["success"] and not final.info["mutated"]


@pytest.mark.mysql
def test_react_auto_submit_and_truncation(mysql_url: str) -> None:
    with IntercodeSqlEnv(db_url=mysql_url, max_turns=2) as env:
        task = env.task(POKER)
        env.reset(task)
        first = env.step("execute[SELECT * FROM people, poker_player]")
        assert len(first.observation) == 350 and not first.done
        last = env.step(f"execute[{task.meta['gold']}]")  # the turn limit submits for the agent
        assert last.done and last.reward == 1 and last.info["auto_submit"]


@pytest.mark.mysql
def test_sql_format_scores_every_query(mysql_url: str) -> None:
    with IntercodeSqlEnv(db_url=mysql_url, action_format="sql") as env:
        task = env.task(POKER)
        env.reset(task)
        wrong = env.step(task.meta["gold"] + " LIMIT 3")
        assert not wrong.done and wrong.reward == 0.6  # IoU 3/5, same order
        right = env.step(task.meta["gold"] + ";")
        assert right.done and right.reward == 1


@pytest.mark.mysql
def test_runaway_query_is_an_error_not_a_hang(mysql_url: str) -> None:
    with IntercodeSqlEnv(db_url=mysql_url, statement_timeout_s=0.5) as env:
        env.reset(env.task(POKER))
        assert "max_statement_time exceeded" in env.step("execute[SELECT SLEEP(3)]").observation
        assert env.step("execute[SELECT 1]").observation == "[(1,)]"


@pytest.mark.mysql
def test_replay_sample_agrees(mysql_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # 40 episodes spread over all databases
    result = replay(str(RECORDINGS), db_url=mysql_url, every=26, output=str(tmp_path / "outcomes.jsonl"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"agreement: {result['matched']}/{result['total']}"
    assert result["total"] == 40 and result["mutated"] == 0
    assert result["matched"] / result["total"] >= 0.95, lines


@pytest.mark.mysql
def test_replay_multiturn_style_and_mutations(mysql_url: str, tmp_path: Path) -> None:
    gold = IntercodeSqlEnv().task(POKER).meta["gold"]

    def episode(actions: list[str], rewards: list[float], observations: list[str] | None = None) -> dict:
        observations = observations or ["" for _ in actions]
        history = {"actions": actions, "rewards": rewards, "observations": observations}
        return {"task_id": POKER, "turn_history": history}

    recordings = {
        "0": episode([gold + " LIMIT 3", "blocked", gold], [0.6, 0, 1]),  # multi-turn: every query scored
        "1": episode(["Let me think", gold], [0, 1], ["No sql code was found in your last response.", ""]),
        "2": episode(["DELETE FROM poker_player", "SELECT * FROM poker_player"], [0, 0]),  # mutates: excluded
        "3": episode(["execute[SHOW TABLES]", "submit"], [0, 0.5]),  # ReAct, wrong recorded reward: disagrees
    }
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(recordings))
    result = replay(str(path), db_url=mysql_url, output=str(tmp_path / "outcomes.jsonl"))
    assert (result["matched"], result["total"], result["mutated"]) == (2, 3, 1)
    assert result["disagreements"][0]["task_id"] == "intercode_sql/0" and result["disagreements"][0]["turn"] == 1


@pytest.mark.mysql
def test_episode_isolation(mysql_url: str) -> None:
    """Destructive episodes change only their own copy; the shared database, later and parallel episodes are intact."""
    users_sql = "SELECT User FROM mysql.user WHERE User LIKE 'hplep%'"
    # a SIGKILLed run elsewhere (e.g. the evaluation tests) may have left its users until the next server start
    users_before = set(admin_rows(mysql_url, "mysql", users_sql))
    schemas_before = set(admin_rows(mysql_url, "mysql", "SHOW DATABASES LIKE 'hplep%'"))
    with IntercodeSqlEnv(db_url=mysql_url, max_turns=100) as a, IntercodeSqlEnv(db_url=mysql_url, max_turns=100) as b:
        task = a.task(POKER)
        people = admin_rows(mysql_url, "poker_player", "SELECT * FROM people ORDER BY People_ID")
        a.reset(task)
        b.reset(task)  # in flight at the same time as a's episode
        assert a.step("execute[DELETE FROM poker_player]").observation == "None"
        assert a.step("execute[DROP TABLE poker_player]").observation == "None"
        assert a.step("execute[DELETE FROM people]").info["mutated"]
        assert a.step("execute[CREATE TABLE intruder (x INT)]").observation == "None"
        assert a.step("execute[SHOW TABLES]").observation == "[('intruder',), ('people',)]"
        assert a.step("execute[SELECT COUNT(*) FROM people]").observation == "[(0,)]"
        for escape in ("USE concert_singer", "SELECT * FROM concert_singer.singer", "DROP DATABASE concert_singer",
                       "CREATE DATABASE evil", "SELECT * FROM mysql.user"):
            assert "denied" in a.step(f"execute[{escape}]").observation, escape
        assert a.step("execute[USE poker_player]").observation == "None"  # its own database: the copy
        assert a.step("execute[SELECT COUNT(*) FROM people]").observation == "[(0,)]"
        assert a.mutated

        # b ran alongside a and sees none of it; it mutates too, in its own copy
        assert b.step("execute[SHOW TABLES]").observation == "[('people',), ('poker_player',)]"
        assert b.step("execute[SELECT COUNT(*) FROM people]").observation == f"[({len(people)},)]"
        b.step("execute[UPDATE people SET Name = 'X']")
        assert a.step("execute[SELECT COUNT(*) FROM people]").observation == "[(0,)]"
        assert not a.step(f"execute[{task.meta['gold']}]").done
        assert a.step("submit").reward == 0  # scored against the pristine gold, not the emptied tables

        # the shared database is unchanged, and the next episode's gold query gives the same answer
        assert admin_rows(mysql_url, "poker_player", "SELECT * FROM people ORDER BY People_ID") == people
        a.reset(task)
        assert a.step("execute[SHOW TABLES]").observation == "[('people',), ('poker_player',)]"
        a.step(f"execute[{task.meta['gold']}]")
        assert a.step("submit").reward == 1
    leftovers = set(admin_rows(mysql_url, "mysql", users_sql)) - users_before
    schemas = set(admin_rows(mysql_url, "mysql", "SHOW DATABASES LIKE 'hplep%'")) - schemas_before
    assert leftovers == set() and schemas == set()  # this test's episodes cleaned up their users and copies


@pytest.mark.mysql
def test_parallel_episodes_in_threads(mysql_url: str) -> None:
    """Four episodes on one database in flight at once (threads): two write, each sees only its own change."""
    writes = {0: "DELETE FROM poker_player", 1: "UPDATE people SET Name = 'X'"}
    probe = "SELECT (SELECT COUNT(*) FROM poker_player), (SELECT COUNT(*) FROM people WHERE Name = 'X')"
    in_flight = threading.Barrier(4)
    seen: dict[int, tuple[str, bool]] = {}

    def run(slot: int) -> None:
        with IntercodeSqlEnv(db_url=mysql_url) as env:
            env.reset(env.task(POKER))
            in_flight.wait()
            if slot in writes:
                env.step(f"execute[{writes[slot]}]")
            in_flight.wait()  # every write is done before anyone looks
            seen[slot] = (env.step(f"execute[{probe}]").observation, env.mutated)

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    players = admin_rows(mysql_url, "poker_player", "SELECT COUNT(*) FROM poker_player")[0][0]
    people = admin_rows(mysql_url, "poker_player", "SELECT COUNT(*) FROM people")[0][0]
    assert seen[0] == ("[(0, 0)]", True)
    assert seen[1] == (f"[({players}, {people})]", True)
    assert seen[2] == seen[3] == (f"[({players}, 0)]", False)


# ------------------------------------------------------------------------------------------------ server failures
@pytest.mark.mysql
def test_killed_connection_crashes_the_episode(private_mysql: tuple[str, dict[str, str]]) -> None:
    url, _ = private_mysql
    with IntercodeSqlEnv(db_url=url) as env:
        task = env.task(POKER)
        env.reset(task)
        connection_id = env.execute("SELECT CONNECTION_ID()").rows[0][0]  # type: ignore[index]
        admin_rows(url, "mysql", f"KILL {connection_id}")
        with pytest.raises(EnvironmentCrashed):
            env.step(f"execute[{task.meta['gold']}]")
        env.reset(task)  # a new episode works
        env.step(f"execute[{task.meta['gold']}]")
        assert env.step("submit").reward == 1


@pytest.mark.mysql
def test_server_down_and_restart(private_mysql: tuple[str, dict[str, str]]) -> None:
    url, server_env = private_mysql
    with IntercodeSqlEnv(db_url=url, connect_timeout_s=1.0) as env:
        task = env.task(POKER)
        env.reset(task)
        env.step("execute[DELETE FROM poker_player]")  # the episode has a copy, which the restart would keep
        server_script("stop_mysql.sh", server_env)
        with pytest.raises(EnvironmentCrashed):
            env.step(f"execute[{task.meta['gold']}]")
        with pytest.raises(EnvironmentCrashed, match="start_mysql.sh"):
            env.reset(task)  # still down after connect_timeout_s

        server_script("start_mysql.sh", server_env)  # restarted mid-episode: the episode's session is gone, so it crashes
        env.reset(task)
        env.step("execute[SELECT 1]")
        server_script("stop_mysql.sh", server_env)
        server_script("start_mysql.sh", server_env)
        with pytest.raises(EnvironmentCrashed):
            env.step(f"execute[{task.meta['gold']}]")

    with IntercodeSqlEnv(db_url=url, connect_timeout_s=60.0) as env:  # reset waits for a server that is starting
        server_script("stop_mysql.sh", server_env)
        starter = threading.Timer(1.0, server_script, args=("start_mysql.sh", server_env))
        starter.start()
        t0 = time.monotonic()
        env.reset(task)
        starter.join()
        assert time.monotonic() - t0 >= 1.0
        env.step(f"execute[{task.meta['gold']}]")
        assert env.step("submit").reward == 1
    assert admin_rows(url, "mysql", "SELECT User FROM mysql.user WHERE User LIKE 'hplep%'") == []
    assert admin_rows(url, "mysql", "SHOW DATABASES LIKE 'hplep%'") == []


# ------------------------------------------------------------------------------------------------ a hostile agent
def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Polls ``condition`` until it holds or ``seconds`` pass (a bound for a loaded machine, not a timing claim)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def server_command(url: str, thread_id: int) -> str | None:
    """What the server thread ``thread_id`` is doing ('Query', 'Sleep', ...), None once it is gone."""
    rows = admin_rows(url, "information_schema", f"SELECT COMMAND FROM PROCESSLIST WHERE ID = {int(thread_id)}")
    return rows[0][0] if rows else None


MEMORY_PROBE = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))  # the old client would take the machine's memory
from hpl_lightning.envs.intercode_sql import IntercodeSqlEnv
with IntercodeSqlEnv(db_url=sys.argv[1], statement_timeout_s=120) as env:
    env.reset(env.task(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cross = env.step("execute[SELECT * FROM " + ", ".join(f"people p{i}" for i in range(12)) + "]").observation
    giant = env.step("execute[SELECT " + ", ".join(["REPEAT('x', 15000000)"] * 20) + "]").observation  # 300 MB row
    after = env.step("execute[SELECT COUNT(*) FROM people]").observation
    env.step("execute[SELECT * FROM people a, people b, people c, people d, people e, people f, people g]")
    reward = env.step("submit").reward
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB -> MiB
print(json.dumps({"cross": cross, "giant": giant, "after": after, "reward": reward, "grown_mib": grown}))
"""


@pytest.mark.mysql
def test_huge_results_are_cut_and_memory_stays_bounded(mysql_url: str) -> None:
    """A 12-way cross join (7^12 rows) and a 300 MB row: the client reads at most a few MiB of each (it used to
    buffer the whole result, 3.3 GB in 30 s), the agent is told the result was cut, and a cut result scores 0."""
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, mysql_url], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["cross"].startswith("[(1, 'Russia'") and out["cross"].endswith(
        "\n[result cut: more than 4 MiB; the statement was stopped]")
    assert out["giant"].startswith("[]\n[result cut: more than 36 MiB; the statement was stopped and the "
                                   "session restarted")
    assert out["after"] == "[(7,)]"  # the restarted session goes on
    assert out["reward"] == 0
    assert out["grown_mib"] < 200, out  # old client: MemoryError at the 2 GiB address-space limit
    assert "Exception ignored" not in done.stderr


@pytest.mark.mysql
@pytest.mark.parametrize("lift", [["SET SESSION max_statement_time = 0", "SELECT SLEEP(60)"],
                                  ["SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(60)"]],
                         ids=["set-session", "set-statement"])
def test_agent_cannot_lift_the_time_limit_and_close_leaves_no_thread(mysql_url: str, lift: list[str]) -> None:
    """The agent may change its session's max_statement_time; the statement is killed on the server anyway."""
    with IntercodeSqlEnv(db_url=mysql_url, statement_timeout_s=2) as env:
        env.reset(env.task(POKER))
        thread = env.execute("SELECT CONNECTION_ID()").rows[0][0]  # type: ignore[index]
        for sql in lift[:-1]:
            assert env.step(f"execute[{sql}]").observation == "None"
        timed_out = env.step(f"execute[{lift[-1]}]")
        assert timed_out.observation == "Error executing query: " + TIME_LIMIT_MESSAGE
        assert wait_for(lambda: server_command(mysql_url, thread) != "Query")  # killed, not just abandoned
        assert env.step("execute[SELECT COUNT(*) FROM people]").observation == "[(7,)]"  # the episode goes on
    assert wait_for(lambda: server_command(mysql_url, thread) is None)


@pytest.mark.mysql
def test_one_episodes_locks_never_block_another(mysql_url: str) -> None:
    """Episode a holds row locks on the shared tables in an open transaction; episode b still gets its copy, and
    episode c's own locking read of those rows waits at most the statement limit."""
    envs = [IntercodeSqlEnv(db_url=mysql_url, statement_timeout_s=2) for _ in range(3)]
    a, b, c = envs
    try:
        task = a.task(POKER)
        for env in envs:
            env.reset(task)
        assert a.step("execute[START TRANSACTION]").observation == "None"
        assert a.step("execute[SELECT * FROM people FOR UPDATE]").observation.startswith("[(1, 'Russia'")
        assert b.step("execute[DELETE FROM poker_player]").observation == "None"  # copies the locked people
        assert b.mutated and b.step("execute[SELECT COUNT(*) FROM people]").observation == "[(7,)]"
        assert c.step("execute[SELECT * FROM people FOR UPDATE]").observation.startswith("Error executing query")
        a.reset(task)  # a's episode ends: its transaction and locks go with its session
        assert c.step("execute[SELECT COUNT(*) FROM people FOR UPDATE]").observation == "[(7,)]"
    finally:
        for env in envs:
            env.close()
