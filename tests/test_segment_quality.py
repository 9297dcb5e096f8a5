"""Segmentation quality: boundary matching and the metrics on hand-made covers (no model, no simulator), and the
``segment-quality`` command on recorded ScienceWorld-like trajectories (no simulator: they are all given)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hpl_lightning import segment_quality as sq
from hpl_lightning.schema import to_json, write_jsonl
from hpl_lightning.segmentation import validate_cover
from tests.test_segmentation import FakeChatServer, fake_server, make_trajectory  # noqa: F401 - a fixture


def test_boundaries_are_the_starts_of_all_groups_but_the_first() -> None:
    assert sq.boundaries([(0, 1), (2, 4), (5, 5)]) == [2, 5]
    assert sq.boundaries([(0, 6)]) == []


@pytest.mark.parametrize(
    "predicted,reference,tolerance,expected",
    [
        ([2, 5, 9], [3, 5, 7], 0, 1),
        ([2, 5, 9], [3, 5, 7], 1, 2),  # 2~3, 5=5; 9 is two from 7
        ([2, 5, 9], [3, 5, 7], 2, 3),
        ([3, 4], [4], 1, 1),  # one-to-one: two cuts around one boundary count once
        ([4], [3, 5], 1, 1),
        ([4, 5], [5, 6], 1, 2),  # pairing 5 with 5 would leave 4 unmatched: greedy from the left pairs 4~5, 5~6
        ([], [3], 1, 0),
        ([3], [], 1, 0),
    ],
)
def test_matched_boundaries(predicted: list, reference: list, tolerance: int, expected: int) -> None:
    assert sq.matched(predicted, reference, tolerance) == expected


def test_compare_on_a_hand_made_cover() -> None:
    reference = [(0, 2), (3, 5)]  # one sub-goal boundary, before action 3
    predicted = [(0, 1), (2, 4), (5, 5)]  # cuts before 2 and 5; group (2, 4) holds the boundary
    c = sq.compare(predicted, reference)
    assert c == sq.Counts(trajectories=1, actions=6, groups=3, reference_groups=2, boundaries=2,
                          reference_boundaries=1, exact=0, near=1, straddling=1)
    s = sq.scores(c)
    assert (s["precision"], s["recall"], s["f1"]) == (0.0, 0.0, 0.0)
    assert (s["precision_near"], s["recall_near"]) == (0.5, 1.0) and s["f1_near"] == pytest.approx(2 / 3)
    assert (s["mean_group_length"], s["reference_mean_group_length"], s["straddling"]) == (2.0, 3.0, 1 / 3)


def test_scores_pool_trajectories_and_say_when_undefined() -> None:
    a = sq.compare([(0, 2), (3, 5)], [(0, 2), (3, 5)])  # perfect
    b = sq.compare([(0, 0), (1, 1), (2, 3)], [(0, 1), (2, 3)])  # cuts before 1 and 2; reference before 2
    s = sq.scores(a + b)
    assert (s["precision"], s["recall"], s["trajectories"]) == (2 / 3, 1.0, 2)
    assert s["f1"] == pytest.approx(0.8) and s["straddling"] == 0.0
    single = sq.scores(sq.compare([(0, 3)], [(0, 1), (2, 3)]))  # no cut at all
    assert single["precision"] is None and single["f1"] is None and single["recall"] == 0.0
    assert single["straddling"] == 1.0


def test_random_cover_has_the_group_count_and_is_seeded_per_trajectory() -> None:
    covers = [sq.random_cover(12, 4, sq.trajectory_rng(0, "sciworld/boil/14")) for _ in range(2)]
    assert covers[0] == covers[1] and len(covers[0]) == 4
    validate_cover(covers[0], 12)
    assert sq.random_cover(12, 4, sq.trajectory_rng(1, "sciworld/boil/14")) != covers[0]
    assert sq.random_cover(5, 1, np.random.default_rng(0)) == [(0, 4)]
    assert sq.random_cover(5, 5, np.random.default_rng(0)) == [(i, i) for i in range(5)]


def test_stratified_takes_the_first_variations_of_each_task_type() -> None:
    variations = [("boil", 1), ("melt", 4), ("boil", 2), ("boil", 3), ("melt", 5), ("freeze", 6)]
    assert sq.stratified(variations, 2) == [("boil", 1), ("melt", 4), ("boil", 2), ("melt", 5), ("freeze", 6)]


def test_count_pools_per_task_type_with_the_random_baseline() -> None:
    golds = [sq.Gold("sciworld/boil/1", "boil", list("abcdef"), 0, [0, 10, 10, 50, 50, 100], [(0, 1), (2, 3), (4, 5)]),
             sq.Gold("sciworld/boil/2", "boil", list("abc"), 0, [50, 50, 100], [(0, 1), (2, 2)]),
             sq.Gold("sciworld/melt/3", "melt", list("abcd"), 5, [5, 20, 20, 100], [(0, 1), (2, 3)])]
    covers = {"fixed_k": [[(0, 2), (3, 5)], [(0, 2)], [(0, 2), (3, 3)]]}
    counts, randoms = sq.count(golds, covers, seed=0, draws=4)
    assert list(counts) == ["fixed_k", sq.RANDOM] and set(counts["fixed_k"]) == {"boil", "melt"}
    assert counts["fixed_k"]["boil"] == sq.compare(covers["fixed_k"][0], golds[0].reference) + sq.compare(
        covers["fixed_k"][1], golds[1].reference)
    assert counts[sq.RANDOM]["boil"].trajectories == 8 and counts[sq.RANDOM]["melt"].groups == 4 * 2
    assert all(len(c) == len(g.reference) for g in golds for c in randoms[g.id])
    result = sq.table(counts)
    assert result["fixed_k"][sq.ALL] == sq.scores(counts["fixed_k"]["boil"] + counts["fixed_k"]["melt"])
    assert result["fixed_k"]["melt"]["straddling"] == 0.5  # (0, 2) holds the cut before 2


def test_worst_group_shows_the_straddled_sub_goals() -> None:
    gold = sq.Gold("t", "x", list("abcde"), 0, [0, 10, 20, 20, 100], [(0, 1), (2, 2), (3, 4)])
    example = sq.worst_group("fixed_k", gold, [(0, 2), (3, 4)])
    assert example is not None and example.group == (0, 2) and example.cuts == [2]
    assert example.lines == ["  0  a", "  1  b  <- score 0 -> 10", "  2  c  <- score 10 -> 20"]
    assert sq.worst_group("fixed_k", gold, gold.reference) is None
    other = sq.Gold("u", "x", list("abcd"), 0, [10, 20, 30, 100], [(0, 0), (1, 1), (2, 2), (3, 3)])
    worst = sq.worst_example("fixed_k", [gold, other], [[(0, 2), (3, 4)], [(0, 3)]])
    assert worst is not None and (worst.trajectory, worst.cuts) == ("u", [1, 2, 3])


def test_segment_quality_command_on_recorded_trajectories(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           fake_server: FakeChatServer) -> None:
    """Every trajectory given: no simulator starts. Each segmenter and the random baseline get a row, per task
    type and overall, and the report names its command and commit; an LLM answering the reference scores 100."""
    from hpl_lightning.envs.sciworld import DEFAULT_SPLITS
    from hpl_lightning.pipeline import main as pipeline

    protocol = json.loads(Path(DEFAULT_SPLITS).read_text())
    variations = [["boil", 14], ["boil", 15], ["find-animal", 193]]
    protocol["splits"] = {"dev": variations}
    (tmp_path / "splits.json").write_text(json.dumps(protocol))
    experts = []
    for name, variation in variations:
        steps = [(f"Action: {a}", "o") for a in ["look around", "teleport to kitchen", "pick up pot", "focus on pot",
                                                  "move pot to stove", "activate stove", "wait", "look at pot"]]
        t = make_trajectory(f"sciworld/{name}/{variation}", "Your task is to boil water.", steps,
                            start_score=0, scores=[0, 5, 10, 10, 10, 30, 30, 100])
        experts.append(to_json(t))
    write_jsonl(tmp_path / "gold.jsonl", experts)
    fake_server.answer("Task: Your task is to boil water.", "[[0, 1], [2, 2], [3, 5], [6, 7]]")
    llm = {"semantic_llm": {"base_url": fake_server.base_url, "model": "m", "api_key": "k", "fallback": None}}
    out = tmp_path / "report"
    result = pipeline(["segment-quality", "--split", "dev", "--splits", str(tmp_path / "splits.json"),
                       "--experts", str(tmp_path / "gold.jsonl"), "--output_dir", str(out),
                       "--segmenters", '["fixed_k", "jaccard", "uncertainty", "semantic_llm"]', "--policy", "hpl-tiny",
                       "--options", json.dumps(llm), "--random_draws", "3"])
    assert result["trajectories"] == 3 and not result["failed"]
    table = result["table"]
    assert list(table) == ["fixed_k", "jaccard", "uncertainty", "semantic_llm", "random"]
    assert table["semantic_llm"]["all"]["f1"] == 1.0 and table["semantic_llm"]["all"]["straddling"] == 0.0
    assert set(table["fixed_k"]) == {"boil", "find-animal", "all"}
    # the reference cuts before 2, 3 and 6 (after each raise but the last action's); fixed_k before 3 and 6
    assert table["fixed_k"]["all"]["precision"] == 1.0 and table["fixed_k"]["all"]["recall"] == pytest.approx(2 / 3)
    assert table["random"]["all"]["mean_group_length"] == table["random"]["all"]["reference_mean_group_length"] == 2
    printed = capsys.readouterr().out
    assert "| fixed_k | 80 | 100 | 67 |" in printed
    md = (out / "results.md").read_text()
    assert "- command: `hpl-pipeline segment-quality --segmenters" in md and "- commit: `" in md
    assert (out / "results.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["table"]["jaccard"]["all"] == table["jaccard"]["all"]
    rows = [json.loads(line) for line in (out / "covers.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"sciworld/{n}/{v}" for n, v in variations]
    assert rows[0]["reference"] == [[0, 1], [2, 2], [3, 5], [6, 7]] and len(rows[0]["entropies"]) == 8
