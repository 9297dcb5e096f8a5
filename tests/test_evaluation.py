"""Policies (local batched generation, OpenAI-compatible endpoint) and the resumable batched evaluation loop."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from hpl_lightning.envs.intercode_sql import DEFAULT_DATA_DIR, IntercodeSqlEnv
from hpl_lightning.evaluation import EPISODES_FILE, EvaluationAborted, evaluate, read_episodes
from hpl_lightning.policies import Conversation, LocalPolicy, OpenAIPolicy, Policy, truncate_at_stop
from tests.private_mysql import server_script

REPO = Path(__file__).resolve().parents[1]
POKER_TEST_TASKS = [f"intercode_sql/{i}" for i in (0, 5, 24, 77, 108, 157)]  # test tasks on poker_player


# ------------------------------------------------------------------------------------------------------ policies
def test_truncate_at_stop() -> None:
    assert truncate_at_stop("Thought: a\nAction: b\nObservation: c", ["\nObservation:"]) == "Thought: a\nAction: b"
    assert truncate_at_stop("abcabc", ["c", "b"]) == "a"
    assert truncate_at_stop("abc", []) == "abc"


@pytest.fixture(scope="module")
def lively_policy() -> LocalPolicy:
    """hpl-tiny with large random weights: the untrained model repeats one token, this one writes varied text."""
    policy = LocalPolicy("hpl-tiny", max_new_tokens=24, stop=(), threads=1)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for p in policy.model.parameters():
            p.data.normal_(0.0, 0.5)
    return policy


CONVERSATIONS = [
    [{"role": "user", "content": "List the tables."}],
    [{"role": "user", "content": "How many singers are there? " * 12}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "OK"}, {"role": "user", "content": "b c d"}],
]


def test_local_policy_batched_equals_unbatched(lively_policy: LocalPolicy) -> None:
    single = [lively_policy.generate([c])[0] for c in CONVERSATIONS]
    assert len(set(single)) == len(single) and all(len(s) > 10 for s in single)
    assert lively_policy.generate(CONVERSATIONS) == single  # one left-padded batch
    lively_policy.batch_size = 2
    try:
        assert lively_policy.generate(CONVERSATIONS) == single  # split into batches of 2
    finally:
        lively_policy.batch_size = 16


def test_local_policy_stops_at_stop_string(lively_policy: LocalPolicy) -> None:
    full = lively_policy.generate(CONVERSATIONS)
    stop = full[1][8:12]
    lively_policy.stop = (stop,)
    try:
        stopped = lively_policy.generate(CONVERSATIONS)
    finally:
        lively_policy.stop = ()
    for text, cut in zip(full, stopped):
        assert cut == text[: text.find(stop)] if stop in text else cut == text
    assert len(stopped[1]) <= 8


class FakeChatServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that answers 503 to the first ``fail_first`` calls
    and then echoes the last user message as the action (with an observation the client must cut). At temperature
    > 0 it samples a number into the thought the way vLLM samples: from the request's ``seed`` when given (the same
    seed, the same sample), at random otherwise."""

    def __init__(self, fail_first: int = 1, status: int = 503):
        self.requests: list[tuple[dict[str, Any], dict[str, str]]] = []
        self.fail_first, self.status = fail_first, status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((body, dict(self.headers)))
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                if len(server.requests) <= server.fail_first:
                    self.send_error(server.status, "busy")
                    return
                thought = "echo"
                if body.get("temperature", 0) > 0:
                    thought += f" {random.Random(body.get('seed')).randrange(10**9)}"  # seed None: fresh entropy
                text = f"Thought: {thought}\nAction: {body['messages'][-1]['content']}\nObservation: invented"
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_policy_batches_retries_and_cuts_at_stop() -> None:
    conversations = [[{"role": "user", "content": f"task {i}"}] for i in range(6)]
    with FakeChatServer(fail_first=1) as server:
        policy = OpenAIPolicy("served-model", base_url=server.url, api_key="k", max_tokens=64, backoff=0.01,
                              concurrency=3)
        out = policy.generate(conversations)
    assert out == [f"Thought: echo\nAction: task {i}" for i in range(6)]  # in order, observation cut
    assert len(server.requests) == 7  # one 503, retried
    body, headers = server.requests[-1]
    assert body["model"] == "served-model" and body["max_tokens"] == 64 and body["temperature"] == 0.0
    assert body["stop"] == ["\nObservation:"]
    assert headers["Authorization"] == "Bearer k"


def test_openai_policy_samples_differ_per_request_and_repeat_on_a_rerun() -> None:
    """M Monte-Carlo completions of one prompt at temperature 1 are M different samples (a served model seeds each
    request's sampler from its ``seed``), and the same M when the same calls are made again."""
    prompt = [{"role": "user", "content": "task 7"}]
    m = 5
    keys = [f"sciworld/boil/3/step/2/mc/{k}/turn0" for k in range(m)]  # what explore sends: rollout key and turn
    with FakeChatServer(fail_first=0) as server:
        runs = []
        for _ in range(2):  # a fresh policy each time, as a re-run of the pipeline
            policy = OpenAIPolicy("m", base_url=server.url, temperature=1.0, seed=0, backoff=0.01)
            runs.append((policy.generate([prompt] * m, keys), policy.generate([prompt] * m)))
        assert len({body["seed"] for body, _ in server.requests}) == 2 * m  # keyed and keyless seeds all differ
    for keyed, keyless in runs:
        assert len(set(keyed)) == m and len(set(keyless)) == m
    assert runs[0] == runs[1]


def test_openai_policy_gives_up_with_a_clear_error() -> None:
    with FakeChatServer(fail_first=10**6, status=400) as server:  # not retryable
        with pytest.raises(RuntimeError, match="answered 400 after 1 attempt"):
            OpenAIPolicy("m", base_url=server.url, backoff=0.01).generate([[{"role": "user", "content": "x"}]])
        assert len(server.requests) == 1
    with FakeChatServer(fail_first=10**6, status=503) as server:
        with pytest.raises(RuntimeError, match="answered 503 after 3 attempt"):
            OpenAIPolicy("m", base_url=server.url, retries=2, backoff=0.01).generate([[{"role": "user", "content": "x"}]])
    with socket.socket() as s:  # nothing listens on a port just released
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="unreachable after 2 attempt"):
        OpenAIPolicy("m", base_url=f"http://127.0.0.1:{port}/v1", retries=1, backoff=0.01).generate(
            [[{"role": "user", "content": "x"}]]
        )


# ------------------------------------------------------------------------------------------------------ evaluation
class GoldSqlPolicy(Policy):
    """Executes the task's gold query, then submits: every episode that runs to the end must score 1.
    ``on_call`` runs before the given call number (1-based) to break the server mid-evaluation."""

    def __init__(self, on_call: dict[int, Any] | None = None):
        records = json.loads((DEFAULT_DATA_DIR / "ic_spider_dev.json").read_text())
        self.gold = {r["query"]: r["gold"] for r in records}
        self.on_call, self.calls = on_call or {}, 0

    def describe(self) -> dict[str, Any]:
        return {"type": "gold-sql"}

    def generate(self, conversations: list[Conversation]) -> list[str]:
        self.calls += 1
        if self.calls in self.on_call:
            self.on_call[self.calls]()
        return [f"Thought: gold\nAction: execute[{self.gold[c[2]['content']]}]" if len(c) == 3
                else "Thought: done\nAction: submit" for c in conversations]


def test_resume_into_another_run_is_refused(tmp_path: Path) -> None:
    """run.json guards the output directory; nothing needs a server when no task is run (limit 0)."""
    evaluate(GoldSqlPolicy(), "intercode_sql", "test", tmp_path, limit=0, progress=False)
    with pytest.raises(ValueError, match="use another output_dir"):
        evaluate(LocalPolicy("hpl-tiny", max_new_tokens=4), "intercode_sql", "test", tmp_path, limit=0)
    with pytest.raises(ValueError, match="unknown benchmark"):
        evaluate(GoldSqlPolicy(), "nope", "test", tmp_path / "x")


@pytest.mark.mysql
def test_sql_tiny_policy_writes_results_and_resumes_with_a_larger_limit(mysql_url: str, tmp_path: Path) -> None:
    policy = LocalPolicy("hpl-tiny", max_new_tokens=6, threads=1)
    first = evaluate(policy, "intercode_sql", "test", tmp_path, workers=3, limit=4,
                     env_kwargs={"db_url": mysql_url}, progress=False)
    assert first["n"] == 4 and first["failed"] == 0 and first["run"]["env_steps"] == 40  # 10 turns, no action
    for name in ("episodes.jsonl", "summary.json", "outcomes.png", "run.json"):
        assert (tmp_path / name).stat().st_size > 0
    before = (tmp_path / EPISODES_FILE).read_text()
    record = json.loads(before.splitlines()[0])
    assert record["id"] == "intercode_sql/0" and record["turns"] == 10 and record["info"]["auto_submit"]
    assert len(record["messages"]) == 3 + 2 * 10 and record["group"] == "medium"

    second = evaluate(policy, "intercode_sql", "test", tmp_path, workers=3, limit=7,
                      env_kwargs={"db_url": mysql_url}, progress=False)
    after = (tmp_path / EPISODES_FILE).read_text()
    assert after.startswith(before)  # nothing redone or rewritten
    ids = [r.id for r in read_episodes(tmp_path / EPISODES_FILE)]
    assert sorted(ids) == sorted(f"intercode_sql/{i}" for i in range(7))
    assert second["n"] == 7 and second["run"]["episodes"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["n"] == 7
    assert set(second["groups"]) <= {"easy", "medium", "hard", "extra"}


@pytest.mark.mysql
def test_an_episode_that_raises_is_recorded_as_failed_and_the_evaluation_goes_on(
    mysql_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One task's gold query raises MemoryError in the environment (as a result too large for memory would): that
    episode is recorded with the reason after its retry, the others are scored."""
    doomed = IntercodeSqlEnv().task(5).meta["gold"]
    run_bounded = IntercodeSqlEnv._run_bounded

    def exhausting(self: IntercodeSqlEnv, ep: Any, sql: str) -> Any:
        if sql == doomed:
            raise MemoryError("result too large")
        return run_bounded(self, ep, sql)

    monkeypatch.setattr(IntercodeSqlEnv, "_run_bounded", exhausting)
    summary = evaluate(GoldSqlPolicy(), "intercode_sql", "test", tmp_path, workers=2, task_ids=POKER_TEST_TASKS,
                       env_kwargs={"db_url": mysql_url}, progress=False)
    records = {r.id: r for r in read_episodes(tmp_path / EPISODES_FILE)}
    assert sorted(records) == sorted(POKER_TEST_TASKS)
    failed = records.pop("intercode_sql/5")
    assert failed.attempts == 2 and failed.error is not None
    assert "attempt 2: MemoryError at " in failed.error and failed.error.endswith(": result too large")
    assert all(r.error is None and r.reward == 1.0 for r in records.values())
    assert summary["failed"] == 1 and summary["n"] == 5


class LingeringGoldSqlPolicy(GoldSqlPolicy):
    """``GoldSqlPolicy`` that first runs ``SELECT 1`` three times on one task, so that episode finishes last."""

    def __init__(self, lingering: str):
        super().__init__()
        self.lingering = lingering

    def generate(self, conversations: list[Conversation]) -> list[str]:
        out = super().generate(conversations)
        for i, c in enumerate(conversations):
            if c[2]["content"] == self.lingering and len(c) <= 3 + 2 * 3:
                out[i] = ("Thought: look first\nAction: execute[SELECT 1]" if len(c) < 3 + 2 * 3
                          else f"Thought: gold\nAction: execute[{self.gold[self.lingering]}]")
        return out


@pytest.mark.mysql
def test_episodes_are_written_in_task_order_whatever_finishes_first(mysql_url: str, tmp_path: Path) -> None:
    """The finish order depends on the pool size and the machine's load; the episode file does not."""
    policy = LingeringGoldSqlPolicy(IntercodeSqlEnv().task(0).description)
    summary = evaluate(policy, "intercode_sql", "test", tmp_path, workers=2, task_ids=POKER_TEST_TASKS[:3],
                       env_kwargs={"db_url": mysql_url}, progress=False)
    records = read_episodes(tmp_path / EPISODES_FILE)
    assert [r.id for r in records] == POKER_TEST_TASKS[:3] and summary["n"] == 3
    assert [r.turns for r in records] == [5, 2, 2] and all(r.reward == 1.0 for r in records)


@pytest.mark.mysql
@pytest.mark.slow
def test_killed_evaluation_resumes_without_redoing(mysql_url: str, tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "evaluate.py"), "run", "--benchmark", "intercode_sql", "--split", "test",
           "--policy", "hpl-tiny", "--max_new_tokens", "4", "--threads", "1", "--workers", "2", "--limit", "16",
           "--db_url", mysql_url, "--output_dir", str(tmp_path)]
    episodes = tmp_path / EPISODES_FILE
    # SIGKILLed right after its 5th episode is flushed, with the 6th line begun: deterministic, whatever the load
    killed = subprocess.run([sys.executable, "-m", "tests.killers", "hpl_lightning.evaluation", "5", *cmd[1:]],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(episodes.read_text().splitlines()) == 6 and not episodes.read_text().endswith("\n")
    kept = episodes.read_text().rsplit("\n", 1)[0] + "\n"
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert episodes.read_text().startswith(kept)
    ids = [r.id for r in read_episodes(episodes)]
    assert len(ids) == len(set(ids)) == 16
    assert f"{len(kept.splitlines())} already in" in done.stdout
    assert json.loads((tmp_path / "summary.json").read_text())["n"] == 16


# --- a server that goes down: a private one (own port and data dir), so other tests never see it stop -----------
@pytest.mark.mysql
@pytest.mark.slow
def test_server_restart_mid_evaluation_retries_the_lost_episodes(
    private_mysql: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, env = private_mysql

    def restart() -> None:
        server_script("stop_mysql.sh", env)
        threading.Thread(target=server_script, args=("start_mysql.sh", env), daemon=True).start()

    summary = evaluate(GoldSqlPolicy(on_call={3: restart}), "intercode_sql", "test", tmp_path, workers=2,
                       task_ids=POKER_TEST_TASKS, env_kwargs={"db_url": url, "connect_timeout_s": 60},
                       progress=False)
    records = read_episodes(tmp_path / EPISODES_FILE)
    assert sorted(r.id for r in records) == sorted(POKER_TEST_TASKS)
    assert all(r.error is None and r.reward == 1.0 and r.success for r in records)
    assert sum(r.attempts == 2 for r in records) == 2  # the two episodes in flight were started again
    assert summary["avg_reward"] == 1.0 and summary["failed"] == 0 and summary["complete"]


@pytest.mark.mysql
@pytest.mark.slow
def test_server_down_fails_loudly_and_a_rerun_completes(
    private_mysql: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, env = private_mysql
    # call 3 executes the gold queries of episodes 3 and 4 (two workers): the server stops just before
    policy = GoldSqlPolicy(on_call={3: lambda: server_script("stop_mysql.sh", env)})
    try:
        with pytest.raises(EvaluationAborted, match="in a row failed"):
            evaluate(policy, "intercode_sql", "test", tmp_path, workers=2, task_ids=POKER_TEST_TASKS,
                     env_kwargs={"db_url": url, "connect_timeout_s": 1}, progress=False)
    finally:
        server_script("start_mysql.sh", env)
    records = read_episodes(tmp_path / EPISODES_FILE)
    failed = [r for r in records if r.error is not None]
    assert len(failed) == 3 and all("attempt 2" in r.error and r.attempts == 2 for r in failed)
    finished = [r for r in records if r.error is None]
    assert len(finished) == 2 and all(r.reward == 1.0 for r in finished)  # no reward without a server

    summary = evaluate(GoldSqlPolicy(), "intercode_sql", "test", tmp_path, workers=2, task_ids=POKER_TEST_TASKS,
                       env_kwargs={"db_url": url}, progress=False)
    records = read_episodes(tmp_path / EPISODES_FILE)
    assert sorted(r.id for r in records) == sorted(POKER_TEST_TASKS)  # failed ones redone, finished ones kept
    assert all(r.error is None and r.reward == 1.0 for r in records)
    assert summary["run"]["episodes"] == 4 and summary["complete"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="ScienceWorld's simulator needs a Java runtime")
def test_sciworld_dev_with_two_workers(tmp_path: Path) -> None:
    ids = ["sciworld/find-living-thing/186", "sciworld/find-animal/193", "sciworld/find-plant/179"]
    summary = evaluate(LocalPolicy("hpl-tiny", max_new_tokens=6, threads=1), "sciworld", "dev", tmp_path,
                       workers=2, task_ids=ids, progress=False)
    records = read_episodes(tmp_path / EPISODES_FILE)
    assert sorted(r.id for r in records) == sorted(ids)
    assert all(r.error is None and r.turns == 15 and r.info["truncated"] for r in records)  # budget of find-*
    assert summary["n"] == 3 and set(summary["groups"]) == {"find-living-thing", "find-animal", "find-plant"}
    assert summary["run"]["workers"] == 2 and len(summary["run"]["env_memory_bytes"]) == 2
    assert (tmp_path / "outcomes.png").stat().st_size > 0
