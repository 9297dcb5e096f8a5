"""The over-long policy: oldest history turns go first, the task statement never; every drop is counted."""

from __future__ import annotations

import json
import random

import pytest

from hpl_lightning.models import TINY_MODEL, load_tokenizer
from hpl_lightning.schema import DataError, parse_pair
from hpl_lightning.tokenization import ChatTokenizer, TokenizationReport, head_length
from tests.synthetic import head, turns


def _step_pair(n_history: int):
    rng = random.Random(0)
    h = head(rng, 0)
    return parse_pair({
        "id": "s", "task_id": "t", "level": "step", "prompt": h + turns(rng, n_history),
        "chosen": turns(rng, 2), "rejected": turns(rng, 1), "chosen_reward": 1.0, "rejected_reward": 0.0,
    })


def _length(chat: ChatTokenizer, messages) -> int:
    return len(chat.encode(messages, len(messages)).input_ids)


def test_head_length_covers_the_eto_layout():
    h = head(random.Random(0), 0)
    assert head_length(h + turns(random.Random(0), 2)) == 3
    assert head_length([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "Action: x"}]) == 2


@pytest.mark.parametrize("ack", ["OK", "Okay.", "Sure, let's start."])
def test_head_and_actions_agree_on_where_the_task_statement_ends(ack):
    """One rule for tokenization (the unscored head) and segmentation (the actions): any short acknowledgement."""
    from hpl_lightning.segmentation import action_indices, task_statement

    messages = [{"role": "user", "content": "instruction"}, {"role": "assistant", "content": ack},
                {"role": "user", "content": "the task"}, {"role": "assistant", "content": "Action: a"},
                {"role": "user", "content": "Observation: o"}, {"role": "assistant", "content": "Action: b"}]
    assert head_length(messages) == 3 and action_indices(messages) == [3, 5]
    assert task_statement(messages) == "the task"


def test_a_trajectory_without_an_action_after_the_task_statement_is_rejected(tmp_path):
    from hpl_lightning.schema import DataError, load_records

    bad = {"id": "t", "task": "intercode_sql/1", "reward": 1.0,
           "messages": [{"role": "user", "content": "instruction"}, {"role": "assistant", "content": "OK"},
                        {"role": "user", "content": "the task"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**bad, "id": "fine", "messages": bad["messages"] + [
        {"role": "assistant", "content": "Action: a"}]}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'messages': no agent action after the task statement"):
        load_records(path)


def test_truncate_drops_oldest_turns_but_keeps_the_task_statement():
    tokenizer = load_tokenizer(str(TINY_MODEL))
    pair = _step_pair(n_history=6)
    full = ChatTokenizer(tokenizer, 100_000)(pair, TokenizationReport(), "f", 1)
    limit = len(full.chosen.input_ids) - 20  # too long by a little: one or two old turns must go
    report = TokenizationReport()
    example = ChatTokenizer(tokenizer, limit, "truncate")(pair, report, "f", 1)
    assert report.history_truncated == 1 and report.tail_truncated == 0
    assert len(example.chosen.input_ids) <= limit and len(example.rejected.input_ids) <= limit
    text = tokenizer.decode(example.chosen.input_ids)
    assert pair.prompt[2]["content"] in text  # the task statement survives
    assert pair.prompt[3]["content"] not in text  # the oldest action went first
    assert pair.prompt[-1]["content"] in text  # the latest observation stays
    # the scored continuation is untouched
    assert example.chosen.n_scored == full.chosen.n_scored


def test_drop_and_error_policies():
    tokenizer = load_tokenizer(str(TINY_MODEL))
    pair = _step_pair(n_history=6)
    report = TokenizationReport()
    assert ChatTokenizer(tokenizer, 50, "drop")(pair, report, "f.jsonl", 9) is None
    assert report.dropped["over-long"] == 1 and "1 over-long" in report.summary()
    with pytest.raises(DataError, match="f.jsonl:9: .*over max_length 50"):
        ChatTokenizer(tokenizer, 50, "error")(pair, TokenizationReport(), "f.jsonl", 9)


def test_unscorable_drop_is_reported_not_silent():
    tokenizer = load_tokenizer(str(TINY_MODEL))
    pair = _step_pair(n_history=0)
    report = TokenizationReport()
    assert ChatTokenizer(tokenizer, 30, "truncate", unscorable="drop")(pair, report, "f", 1) is None
    assert report.dropped["nothing scorable"] == 1


def _episode(n_turns: int) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": "instruction"}, {"role": "assistant", "content": "OK"},
                {"role": "user", "content": "the task"}]
    for t in range(n_turns):
        messages += [{"role": "assistant", "content": f"Action: a{t}"},
                     {"role": "user", "content": f"Observation: {'o' * (10 + 7 * (t % 3))}"}]
    return messages


def _fits(budget: int):
    return lambda messages: sum(len(m["content"]) for m in messages) <= budget


def test_history_goes_in_blocks_of_turns_the_fewest_that_fit():
    from hpl_lightning.tokenization import truncate_history

    messages = _episode(12)
    one = truncate_history(messages, 3, _fits(200), block=1)
    dropped = (len(messages) - len(one)) // 2
    assert 0 < dropped < 11 and _fits(200)(one) and not _fits(200)(messages[:3] + messages[3 + 2 * (dropped - 1):])
    four = truncate_history(messages, 3, _fits(200), block=4)
    assert (len(messages) - len(four)) // 2 == -(-dropped // 4) * 4  # rounded up to a whole block
    assert four[:3] == messages[:3] and four[3:] == messages[len(messages) - len(four) + 3:]  # head + newest turns
    assert truncate_history(messages, 3, _fits(10_000), block=4) == messages  # fits: nothing goes
    assert truncate_history(messages, 3, _fits(0), block=4) == messages[:3] + messages[-1:]  # head + last at most
    for budget in (0, 150, 200, 10_000):  # what is returned was checked (training keeps the encodings it checked)
        checked: list = []
        out = truncate_history(messages, 3, lambda m: checked.append(m) or _fits(budget)(m), block=4)
        assert out in checked


def test_an_overflowing_episode_keeps_its_cut_for_a_block_of_turns():
    """With blocks, the context at turn t+1 extends the context at turn t (a cached context continues) except when
    the history outgrows the window again: at most once per block; dropping single turns moves the cut every turn."""
    from hpl_lightning.tokenization import truncate_history

    def breaks(block: int) -> int:
        contexts = [truncate_history(_episode(t)[:-1], 3, _fits(220), block) for t in range(1, 40)]
        return sum(later[:len(earlier)] != earlier for earlier, later in zip(contexts, contexts[1:]))

    assert breaks(1) > 25  # single turns: once the window is full, nearly every turn re-cuts
    assert 0 < breaks(4) <= 39 // 4 + 1
