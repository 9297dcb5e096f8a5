"""Segmenters: exact boundaries of the rules, valid covers on real InterCode-SQL episodes, and the LLM segmenter's
real HTTP client path against a local fake OpenAI-compatible server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hpl_lightning.schema import Trajectory, to_json, write_jsonl
from hpl_lightning.segmentation import (
    SEGMENTERS,
    EmbeddingConfig,
    EmbeddingSegmenter,
    InvalidCover,
    JaccardConfig,
    LLMRequestError,
    LLMSegmenter,
    UncertaintyConfig,
    UncertaintySegmenter,
    action_indices,
    build_segmenter,
    entropy_threshold,
    format_stats,
    fixed_k_groups,
    fixed_n_groups,
    parse_ranges,
    repair_cover,
    segment_stats,
    subgoal_groups,
    task_statement,
    threshold_groups,
    trajectory_steps,
    uncertainty_groups,
    validate_cover,
)

INTERCODE = Path(__file__).resolve().parents[2] / "shared/data/intercode_sql/gpt-3.5_react_10_turns.json"


def make_trajectory(tid: str, task: str, steps: list[tuple[str, str]], **meta: object) -> Trajectory:
    """An ETO-style episode: instruction, "OK", the task statement ``task``, then (action, observation) turns. The
    record's ``task`` field is an identifier, as in real data (``intercode_sql/<id>``), not the statement."""
    messages = [
        {"role": "user", "content": "You are an agent. Act with Thought/Action lines."},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": task},
    ]
    for action, observation in steps:
        messages.append({"role": "assistant", "content": action})
        messages.append({"role": "user", "content": f"Observation: {observation}"})
    return Trajectory(tid, f"intercode_sql/{tid}", messages, 1.0, dict(meta))


def intercode_trajectories(task_ids: list[str]) -> list[Trajectory]:
    """Recorded gpt-3.5 ReAct episodes as Trajectory records."""
    episodes = json.loads(INTERCODE.read_text())
    out = []
    for tid in task_ids:
        h = episodes[tid]["turn_history"]
        steps = [(f"Thought: {t}\nAction: {a}", o) for t, a, o in zip(h["thoughts"], h["actions"], h["observations"])]
        out.append(make_trajectory(f"ic_sql-{tid}", episodes[tid]["query"], steps))
    return out


def n_actions(t: Trajectory) -> int:
    return len(action_indices(t.messages))


@pytest.fixture(scope="module")
def real() -> list[Trajectory]:
    # 2 to 11 actions; successful, partial and failed episodes
    return intercode_trajectories(["0", "1", "5", "17", "26", "40", "48", "101", "512"])


# ---------------------------------------------------------------------------------------------------------------
# actions of a trajectory


def test_action_indices_skip_eto_head_and_system() -> None:
    eto = make_trajectory("a", "task", [("Action: a0", "o0"), ("Action: a1", "o1")])
    assert action_indices(eto.messages) == [3, 5]
    system = [{"role": "system", "content": "sys"}, *eto.messages]
    assert action_indices(system) == [4, 6]
    plain = [{"role": "user", "content": "task"}, {"role": "assistant", "content": "Action: a0"},
             {"role": "user", "content": "o0"}, {"role": "assistant", "content": "Action: a1"}]
    assert action_indices(plain) == [1, 3]
    steps = trajectory_steps(Trajectory("p", "task", plain, 0.0))
    assert [(s.command, s.observation) for s in steps] == [("a0", "o0"), ("a1", "")]


# ---------------------------------------------------------------------------------------------------------------
# the shared validator


@pytest.mark.parametrize(
    "groups, n, kind, problem",
    [
        ([(0, 1), (3, 4)], 5, "gap", "gap at action 2"),
        ([(0, 2), (2, 4)], 5, "overlap", "overlap at action 3"),
        ([(0, 1), (2, 5)], 5, "out_of_range", "past the last action 4"),
        ([(0, 1)], 5, "gap", "actions 2..4 are not covered"),
        ([(2, 4), (0, 1)], 5, "gap", "gap at action 0"),
        ([(0, 2, 3)], 3, "malformed", "malformed"),
        ([(0, 1), (2, 1)], 3, "reversed", "ends before"),
    ],
)
def test_validate_cover_rejects(groups: list, n: int, kind: str, problem: str) -> None:
    with pytest.raises(InvalidCover, match=problem) as e:
        validate_cover(groups, n)
    assert e.value.kind == kind


# ---------------------------------------------------------------------------------------------------------------
# fixed-N / fixed-K


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, [(0, 0)]),
        (2, [(0, 0), (1, 1)]),  # n < N: one action per group
        (3, [(0, 0), (1, 1), (2, 2)]),
        (4, [(0, 1), (2, 3)]),  # ceil(4/3) = 2: the paper's rule gives 2 groups
        (7, [(0, 2), (3, 5), (6, 6)]),
        (9, [(0, 2), (3, 5), (6, 8)]),
        (10, [(0, 3), (4, 7), (8, 9)]),
    ],
)
def test_fixed_n(n: int, expected: list) -> None:
    assert fixed_n_groups(n, 3) == expected
    validate_cover(expected, n)


@pytest.mark.parametrize(
    "n, expected",
    [(1, [(0, 0)]), (2, [(0, 1)]), (3, [(0, 2)]), (4, [(0, 2), (3, 3)]), (8, [(0, 2), (3, 5), (6, 7)])],
)
def test_fixed_k(n: int, expected: list) -> None:
    assert fixed_k_groups(n, 3) == expected


# ---------------------------------------------------------------------------------------------------------------
# uncertainty


ENTROPIES = [0.9, 0.1, 0.8, 0.2, 0.3, 0.5, 0.7, 0.95]  # above 0.6: actions 0, 2, 6, 7


def test_uncertainty_start_placement_paper() -> None:
    # a new group starts at each uncertain action (action 0 already starts one)
    assert uncertainty_groups(ENTROPIES, 0.6, "start") == [(0, 1), (2, 5), (6, 6), (7, 7)]


def test_uncertainty_close_placement_release() -> None:
    # the group closes at each uncertain action (the last action closes the last group anyway)
    assert uncertainty_groups(ENTROPIES, 0.6, "close") == [(0, 0), (1, 2), (3, 6), (7, 7)]


def test_uncertainty_threshold_is_strict_and_edge_cases() -> None:
    assert uncertainty_groups([0.5, 0.5, 0.5], 0.5) == [(0, 2)]
    assert uncertainty_groups([1.0], 0.0, "start") == [(0, 0)]
    assert uncertainty_groups([1.0], 0.0, "close") == [(0, 0)]
    assert uncertainty_groups([1.0, 1.0, 1.0], 0.0, "start") == [(0, 0), (1, 1), (2, 2)]


def test_entropy_threshold_percentile_over_dataset() -> None:
    assert entropy_threshold([[1, 2], [3, 4, 5]]) == pytest.approx(4.2)  # 80th of 1..5, linear interpolation
    assert entropy_threshold([[0, 10]], percentile=50) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        entropy_threshold([[], []])


def test_uncertainty_segmenter_sources_and_dataset_threshold() -> None:
    a = make_trajectory("a", "t", [(f"Action: x{i}", "o") for i in range(4)], action_entropies=[0.1, 0.2, 0.3, 0.9])
    b = make_trajectory("b", "t", [(f"Action: y{i}", "o") for i in range(4)], action_entropies=[0.1, 0.8, 0.2, 0.1])
    seg = build_segmenter("uncertainty")  # reads meta; ε = 80th percentile of all 8 entropies = 0.6
    assert seg.segment_many([a, b]) == [[(0, 2), (3, 3)], [(0, 0), (1, 3)]]
    by_id = {"a": [5.0, 0, 0, 0], "b": [0, 0, 5.0, 0]}
    seg = UncertaintySegmenter(UncertaintyConfig(threshold=1.0, placement="close"), entropies=by_id)
    assert seg.segment_many([a, b]) == [[(0, 0), (1, 3)], [(0, 2), (3, 3)]]
    seg = UncertaintySegmenter(UncertaintyConfig(threshold=1.0), entropies=lambda t: by_id[t.id])
    assert seg.segment(b) == [(0, 1), (2, 3)]
    with pytest.raises(ValueError, match="need 4"):
        UncertaintySegmenter(entropies={"a": [1.0]}).segment(a)


# ---------------------------------------------------------------------------------------------------------------
# similarity thresholds and Jaccard


@pytest.mark.parametrize(
    "scores,start,expected",
    [
        ([0, 5, 5, 10, 10, 100], 0, [(0, 1), (2, 3), (4, 5)]),  # cut after each raising action
        ([8, 17, 17, 67, 100], 0, [(0, 0), (1, 1), (2, 3), (4, 4)]),  # the first action raised it
        ([8, 8, 17], 8, [(0, 2)]),  # points for the starting state are no cut
        ([5, 3, 5, 100], 0, [(0, 0), (1, 2), (3, 3)]),  # a raise after a drop is a raise
        ([0, 0, 100, 100], 0, [(0, 2), (3, 3)]),  # actions after the last raise: the last group
        ([100], 0, [(0, 0)]),
    ],
)
def test_subgoal_groups(scores: list, start: int, expected: list) -> None:
    assert subgoal_groups(scores, start) == expected


def test_subgoal_segmenter_reads_the_scores_and_needs_them() -> None:
    steps = [(f"Action: a{i}", "o") for i in range(4)]
    t = make_trajectory("t", "task", steps, scores=[0, 40, 40, 100], start_score=0)
    assert build_segmenter("subgoal").segment(t) == [(0, 1), (2, 3)]
    for meta in ({}, {"scores": [0, 40, 100], "start_score": 0}, {"scores": [0, 40, 40, 100]}):
        with pytest.raises(ValueError, match="'t': the subgoal segmenter needs the simulator's score after each of "
                                             "its 4 actions"):
            build_segmenter("subgoal").segment(make_trajectory("t", "task", steps, **meta))


def test_threshold_groups_min_and_max() -> None:
    sims = [0.9, 0.1, 0.9, 0.9, 0.1, 0.1]  # 7 actions; dissimilar before 2, 5, 6
    assert threshold_groups(sims, 0.5) == [(0, 1), (2, 4), (5, 5), (6, 6)]
    assert threshold_groups(sims, 0.5, min_group=2) == [(0, 1), (2, 4), (5, 6)]
    assert threshold_groups(sims, 0.5, max_group=2) == [(0, 1), (2, 3), (4, 4), (5, 5), (6, 6)]
    assert threshold_groups([], 0.5) == [(0, 0)]


def test_jaccard_boundaries_on_webshop_like_actions() -> None:
    steps = [
        ("Thought: find shoes\nAction: search[red running shoes size 9]", "results"),
        ("Thought: refine\nAction: search[red running shoes size 9 men]", "results"),  # 6/7 shared
        ("Thought: open it\nAction: click[B09ABC]", "item"),  # nothing shared: new group
        ("Thought: size\nAction: click[9]", "item"),  # {click} of {click, b09abc, 9}: 1/3
        ("Thought: buy\nAction: click[Buy Now]", "done"),  # {click} of {click, 9, buy, now}: 1/4
    ]
    t = make_trajectory("w", "buy red running shoes", steps)
    seg = build_segmenter("jaccard", {"threshold": 0.3})
    assert seg.similarities(t) == pytest.approx([6 / 7, 0.0, 1 / 3, 1 / 4])
    assert seg.segment(t) == [(0, 1), (2, 3), (4, 4)]
    assert build_segmenter("jaccard", JaccardConfig(threshold=0.2)).segment(t) == [(0, 1), (2, 4)]
    # whole turns share the "thought"/"action" words, so the thoughts blur the boundary
    whole = build_segmenter("jaccard", {"threshold": 0.3, "command_only": False}).similarities(t)
    assert whole[1] > 0


# ---------------------------------------------------------------------------------------------------------------
# semantic embedding on real trajectories


@pytest.fixture(scope="module")
def embedder() -> EmbeddingSegmenter:
    return EmbeddingSegmenter()


def test_embedding_valid_covers_on_real_trajectories(
    embedder: EmbeddingSegmenter, real: list[Trajectory], monkeypatch: pytest.MonkeyPatch
) -> None:
    sims = embedder.similarities(real)
    assert [len(s) for s in sims] == [n_actions(t) - 1 for t in real]
    assert all(-1.0001 <= x <= 1.0001 for s in sims for x in s)
    model = embedder.model
    # a percentile threshold, size limits, actions alone (the default config runs in the every-segmenter test)
    monkeypatch.setattr(
        embedder, "config", EmbeddingConfig(percentile=30, min_group=2, max_group=3, include_observation=False)
    )
    covers = embedder.segment_many(real)
    assert embedder.model is model  # loaded once, reused
    for t, cover in zip(real, covers):
        validate_cover(cover, n_actions(t))
        assert max(e - s + 1 for s, e in cover) <= 3
    two_actions = next(i for i, t in enumerate(real) if n_actions(t) == 2)
    assert covers[two_actions] == [(0, 1)]  # min_group=2 keeps it whole


# ---------------------------------------------------------------------------------------------------------------
# semantic LLM: pure parsing and repair


def test_parse_ranges_finds_json_in_prose_and_fences() -> None:
    assert parse_ranges("[[0,0],[1,1],[2,3],[4,4]]") == [[0, 0], [1, 1], [2, 3], [4, 4]]
    fenced = "Here are the groups:\n```json\n[[0, 1], [2, 4]]\n```\nAction 2 starts a new sub-goal [see above]."
    assert parse_ranges(fenced) == [[0, 1], [2, 4]]
    echoed = "Like the example [[0,0],[1,1],[2,3],[4,4]], my answer is [[0,2],[3,4]]."
    assert parse_ranges(echoed) == [[0, 2], [3, 4]]
    assert parse_ranges('{"groups": [[0, 4]]}') == [[0, 4]]
    with pytest.raises(InvalidCover):
        parse_ranges("I cannot segment [this] trajectory.")


@pytest.mark.parametrize(
    "ranges, n, cover, repairs",
    [
        ([[0, 0], [1, 2]], 3, [(0, 0), (1, 2)], []),
        ([[2, 3], [0, 1]], 4, [(0, 1), (2, 3)], ["unsorted"]),
        ([[1, 2], [3, 4]], 4, [(0, 1), (2, 3)], ["one_based"]),
        ([[0, 1], [3, 4]], 5, [(0, 1), (2, 2), (3, 4)], ["gap"]),
        ([[1, 2]], 4, [(0, 0), (1, 2), (3, 3)], ["gap", "gap"]),
        ([[0, 1], [0, 1], [2], [3, 3]], 4, [(0, 1), (2, 2), (3, 3)], ["single_index", "duplicate"]),
    ],
)
def test_repair_cover(ranges: list, n: int, cover: list, repairs: list) -> None:
    assert repair_cover(ranges, n) == (cover, repairs)
    validate_cover(cover, n)


@pytest.mark.parametrize(
    "ranges, n, kind",
    [
        ([[0, 2], [2, 3]], 4, "overlap"),
        ([[0, 3], [1, 2]], 4, "overlap"),
        ([[0, 1], [2, 6]], 4, "out_of_range"),
        ([[0, 1], [-1, 3]], 4, "out_of_range"),
        ([[2, 1]], 3, "reversed"),
        ([[0, "1"]], 2, "malformed"),
        ([[0, 1.5]], 2, "malformed"),
        ([[]], 2, "malformed"),
    ],
)
def test_repair_cover_rejects_ambiguous(ranges: list, n: int, kind: str) -> None:
    with pytest.raises(InvalidCover) as e:
        repair_cover(ranges, n)
    assert e.value.kind == kind


def test_repair_cover_without_gap_filling() -> None:
    with pytest.raises(InvalidCover, match="not covered"):
        repair_cover([[0, 1], [3, 4]], 5, fill_gaps=False)


# ---------------------------------------------------------------------------------------------------------------
# semantic LLM: the real client against a local fake OpenAI-compatible server


class FakeChatServer:
    """Answers /v1/chat/completions with recorded replies chosen by a key found in the prompt (the task text).

    Each key maps to a list of (status, assistant content) replies served in turn (the last one repeats).
    """

    def __init__(self) -> None:
        self.replies: dict[str, list[tuple[int, str]]] = {}
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                fake.headers.append(dict(self.headers))
                prompt = body["messages"][-1]["content"]
                key = next((k for k in fake.replies if k in prompt), None)
                queue = fake.replies.get(key, [(404, "no recorded answer")])
                status, content = queue.pop(0) if len(queue) > 1 else queue[0]
                if self.path != "/v1/chat/completions":
                    status, content = 404, "wrong path"
                reply = (
                    {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": content}}]}
                    if status == 200 else {"error": {"message": content}}
                )
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def answer(self, key: str, *replies: str | tuple[int, str]) -> None:
        self.replies[key] = [r if isinstance(r, tuple) else (200, r) for r in replies]


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeChatServer]:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = FakeChatServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def llm(server: FakeChatServer, **kw: object) -> LLMSegmenter:
    config = {"model": "fake-gpt", "base_url": server.base_url, "api_key": "sk-test", "retry_backoff": 0.01,
              "timeout": 5.0, **kw}
    return build_segmenter("semantic_llm", config)


def five_step(tid: str) -> Trajectory:
    return make_trajectory(tid, f"task {tid}", [(f"Thought: t{i}\nAction: execute[q{i}]", f"r{i}") for i in range(5)])


def test_llm_parses_good_answer_through_http(fake_server: FakeChatServer) -> None:
    fake_server.answer("task good", "```json\n[[0,0],[1,1],[2,3],[4,4]]\n```")
    seg = llm(fake_server)
    assert seg.segment(five_step("good")) == [(0, 0), (1, 1), (2, 3), (4, 4)]
    assert (seg.stats.valid, seg.stats.repaired, seg.stats.rejected) == (1, 0, 0)
    request = fake_server.requests[0]
    assert request["model"] == "fake-gpt" and request["temperature"] == 0
    prompt = request["messages"][-1]["content"]
    # the task statement (the task message's text), not the record's task id
    assert "Task: task good" in prompt and "intercode_sql/good" not in prompt
    assert "Action 4: Thought: t4\nAction: execute[q4]" in prompt
    assert "Observation 2: Observation: r2" in prompt and "[[0,0],[1,1],[2,3],[4,4]]" in prompt
    assert fake_server.headers[0]["Authorization"] == "Bearer sk-test"


def test_llm_repairs_and_rejects_with_counts(fake_server: FakeChatServer) -> None:
    fake_server.answer("task unsorted", "Groups: [[2,4],[0,1]]")
    fake_server.answer("task onebased", "[[1,2],[3,5]]")
    fake_server.answer("task gap", "[[0,1],[3,4]]")
    fake_server.answer("task overlap", "[[0,2],[2,4]]")
    fake_server.answer("task range", "[[0,1],[2,9]]")
    fake_server.answer("task prose", "These actions form a single sub-goal.")
    ids = ["unsorted", "onebased", "gap", "overlap", "range", "prose"]
    trajectories = [five_step(i) for i in ids] + [make_trajectory("one", "task one", [("Action: submit", "ok")])]
    seg = llm(fake_server, concurrency=3)
    covers = seg.segment_many(trajectories)
    fallback = [(0, 2), (3, 4)]  # fixed_k (K = 3) for rejected answers
    assert covers == [[(0, 1), (2, 4)], [(0, 1), (2, 4)], [(0, 1), (2, 2), (3, 4)], fallback, fallback, fallback,
                      [(0, 0)]]
    s = seg.stats
    assert (s.trivial, s.valid, s.repaired, s.rejected) == (1, 0, 3, 3)
    assert s.repairs == {"unsorted": 1, "one_based": 1, "gap": 1}
    assert s.rejections == {"overlap": 1, "out_of_range": 1, "unparsable": 1}
    assert s.rejected_ids == ["overlap", "range", "prose"]
    assert len(fake_server.requests) == 6  # no request for a single action
    with pytest.raises(InvalidCover, match="overlap"):
        llm(fake_server, fallback=None).segment(five_step("overlap"))


def test_llm_retries_server_errors_and_fails_fast_on_client_errors(fake_server: FakeChatServer) -> None:
    fake_server.answer("task flaky", (503, "overloaded"), (429, "slow down"), "[[0,4]]")
    seg = llm(fake_server, retries=2)
    assert seg.segment(five_step("flaky")) == [(0, 4)]
    assert len(fake_server.requests) == 3
    fake_server.answer("task denied", (401, "bad key"))
    with pytest.raises(LLMRequestError, match="401"):
        seg.segment(five_step("denied"))
    assert len(fake_server.requests) == 4
    fake_server.answer("task down", (500, "boom"))
    with pytest.raises(LLMRequestError, match="HTTP 500.*after 3 attempts"):
        seg.segment(five_step("down"))
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there now: connection refused, retried, then reported
    refused = build_segmenter("semantic_llm", {"base_url": f"http://127.0.0.1:{port}/v1", "retries": 1,
                                               "retry_backoff": 0.01, "api_key": "x"})
    with pytest.raises(LLMRequestError, match="URLError.*after 2 attempts"):
        refused.segment(five_step("down"))


# ---------------------------------------------------------------------------------------------------------------
# registry, every segmenter's covers, stats


def test_build_segmenter_by_name_and_config_errors() -> None:
    assert set(SEGMENTERS) == {"fixed_n", "fixed_k", "uncertainty", "semantic_llm", "semantic_embedding", "jaccard",
                               "subgoal"}
    assert build_segmenter("fixed_n", {"n_groups": 2}).config.n_groups == 2
    with pytest.raises(ValueError, match="unknown config keys"):
        build_segmenter("fixed_k", {"k": 3})
    with pytest.raises(ValueError, match="unknown segmenter"):
        build_segmenter("random")


def test_every_segmenter_gives_valid_covers_on_real_trajectories(
    fake_server: FakeChatServer, embedder: EmbeddingSegmenter, real: list[Trajectory]
) -> None:
    entropies = {t.id: [float((7 * i) % 5) for i in range(n_actions(t))] for t in real}
    for t in real:  # recorded answers: one sensible cover, one repairable, one rejected
        n = n_actions(t)
        fake_server.answer(f"Task: {task_statement(t.messages)}", json.dumps([[0, 0], [1, n - 1]] if n > 2 else [[0, n - 1]]))
    fake_server.answer(f"Task: {task_statement(real[1].messages)}", "[[1, 2]]")
    fake_server.answer(f"Task: {task_statement(real[2].messages)}", "[[0, 3], [1, 2]]")
    segmenters = {name: build_segmenter(name) for name in ("fixed_n", "fixed_k", "jaccard")}
    segmenters["uncertainty"] = build_segmenter("uncertainty", entropies=entropies)
    segmenters["uncertainty_close"] = build_segmenter("uncertainty", {"placement": "close"}, entropies=entropies)
    segmenters["semantic_llm"] = llm(fake_server)
    segmenters["semantic_embedding"] = embedder
    scored = [replace(t, meta={"scores": [10 * (i % 3) for i in range(n_actions(t))], "start_score": 0}) for t in real]
    segmenters["subgoal"] = build_segmenter("subgoal")
    assert {type(s).name for s in segmenters.values()} == set(SEGMENTERS)
    for name, seg in segmenters.items():
        for t, cover in zip(real, seg.segment_many(scored if name == "subgoal" else real)):
            validate_cover(cover, n_actions(t))
    s = segmenters["semantic_llm"].stats
    assert (s.repaired, s.rejected, s.valid) == (1, 1, len(real) - 2)


def test_segment_stats_on_jsonl(tmp_path: Path, fake_server: FakeChatServer, real: list[Trajectory]) -> None:
    path = tmp_path / "traj.jsonl"
    records = []
    for t in real:
        n = n_actions(t)
        record = to_json(t)
        record["meta"] = {"action_entropies": [float(i % 3) for i in range(n)]}
        records.append(record)
        fake_server.answer(f"Task: {task_statement(t.messages)}", json.dumps([[i, i] for i in range(n)]))
    write_jsonl(path, records)
    names = ["fixed_n", "fixed_k", "uncertainty", "jaccard", "semantic_llm"]
    configs = {"semantic_llm": {"base_url": fake_server.base_url, "api_key": "x", "model": "m"}}
    stats = segment_stats(str(path), names, configs)
    assert list(stats) == names
    lengths = [n_actions(t) for t in real]
    for name, s in stats.items():
        assert s["trajectories"] == len(real)
        assert sum(k * v for k, v in s["group_length"]["histogram"].items()) == sum(lengths)  # every action once
        assert s["groups_per_trajectory"]["min"] >= 1
    assert stats["semantic_llm"]["group_length"]["histogram"] == {1: sum(lengths)}
    assert stats["semantic_llm"]["llm"]["valid"] == sum(n > 1 for n in lengths)
    assert "LLM answers: " in format_stats(stats)
    assert stats["fixed_k"]["groups_per_trajectory"]["max"] == -(-max(lengths) // 3)


def test_pipeline_segment_reports_repaired_and_replaced_llm_answers(
    tmp_path: Path, fake_server: FakeChatServer, capsys: pytest.CaptureFixture
) -> None:
    from hpl_lightning.pipeline import main as pipeline

    trajectories = [five_step(i) for i in ("good", "gap", "prose")]
    fake_server.answer("task good", "[[0,1],[2,4]]")
    fake_server.answer("task gap", "[[0,1],[3,4]]")
    fake_server.answer("task prose", "one sub-goal")
    write_jsonl(tmp_path / "e.jsonl", [to_json(t) for t in trajectories])
    options = json.dumps({"base_url": fake_server.base_url, "api_key": "x", "model": "m"})
    result = pipeline(["segment", "--input", str(tmp_path / "e.jsonl"), "--output", str(tmp_path / "s.jsonl"),
                       "--segmenter", "semantic_llm", "--options", options])
    assert (result["llm"]["valid"], result["llm"]["repaired"], result["llm"]["rejected"]) == (1, 1, 1)
    assert ("semantic_llm: LLM answers: 1 valid, 1 invalid and repaired (gap 1), 1 invalid and replaced by fixed_k "
            "(unparsable 1)") in capsys.readouterr().out
