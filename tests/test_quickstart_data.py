"""The bundled InterCode-SQL quickstart data and its builder (no database needed): chosen and rejected sides are
written in the same words, so a pair can only be told apart by the SQL it runs."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from hpl_lightning.envs import parse_action

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("build_quickstart_data", ROOT / "scripts/build_quickstart_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agent_queries_keep_its_sql_on_one_line_and_drop_lookups_and_prose(builder):
    episode = {"turn_history": {"actions": [
        "execute[SHOW TABLES]",
        "execute[DESC singer]",
        "execute[SELECT country , COUNT(*) FROM singers\nGROUP BY country;]",
        "execute[It seems the table does not exist. Can you confirm?]",
        "execute[SELECT country, COUNT(*) FROM singers GROUP BY country]",  # the same query once normalized
        "submit",
    ]}}
    assert builder.agent_queries(episode) == ["SELECT country, COUNT(*) FROM singers GROUP BY country"]


def test_a_multi_line_query_is_executed_whole(builder):
    # an action is read up to the end of its line: a query left on several lines would run only its first line
    turn = builder.query_turn("SELECT name\nFROM singer\nWHERE age > 20;")
    assert parse_action(turn) == "execute[SELECT name FROM singer WHERE age > 20]"


@pytest.mark.parametrize("split", ["train", "val"])
def test_bundled_pairs_differ_only_in_sql(builder, split):
    records = [json.loads(line) for line in open(ROOT / "data" / "quickstart" / f"{split}.jsonl")]
    pairs = [r for r in records if "level" in r]
    assert {r["level"] for r in pairs} == {"trajectory", "step", "group"} and any("messages" in r for r in records)

    def blank(text: str) -> str:
        return re.sub(r"execute\[.*\]", "execute[...]", text)

    def words(turns: list[dict]) -> list[str]:
        """The assistant turns with their SQL blanked out."""
        return [blank(m["content"]) for m in turns if m["role"] == "assistant"]

    for r in pairs:
        assert words(r["chosen"]) == words(r["rejected"]), r["id"]
        assert r["chosen"] != r["rejected"] and r["chosen_reward"] > r["rejected_reward"], r["id"]
    turns = [m for r in records for side in ("messages", "chosen", "rejected") for m in r.get(side, [])]
    templates = {blank(t) for t in (builder.INSPECT, builder.SUBMIT, builder.query_turn("..."))}
    assert set(words([m for m in turns if m["content"] != "OK"])) <= templates  # "OK": the head's reply
