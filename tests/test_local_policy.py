"""LocalPolicy at evaluation: the agent's context stays within the model's window (oldest turns after the task
statement go first, as in training) and a turn ends at a stop string or the end-of-turn token. (The prefix-cache
engine computes the same text: tests/test_prefix_cache.py.)"""

from __future__ import annotations

from dataclasses import asdict

import torch

from hpl_lightning.evaluation import EpisodeRecord
from hpl_lightning.evaluation_cli import cut_turns, window
from hpl_lightning.policies import LocalPolicy
from hpl_lightning.schema import write_jsonl

HEAD = [
    {"role": "user", "content": "You are a lab agent. Answer with Thought: and Action: lines."},
    {"role": "assistant", "content": "OK"},
    {"role": "user", "content": "Task: boil the water in the kitchen."},
]


def conversation(turns: int, observation_words: int = 40) -> list[dict[str, str]]:
    messages = list(HEAD)
    for t in range(turns):
        messages.append({"role": "assistant", "content": f"Thought: step {t}.\nAction: look at thing{t}."})
        messages.append({"role": "user", "content": f"Observation: obs{t} " + "water " * observation_words})
    return messages


def spy_on_generate(policy: LocalPolicy) -> list[tuple[int, int]]:
    """Records (prompt tokens, new tokens) of every model.generate call."""
    calls, real = [], policy.model.generate

    def generate(input_ids, **kwargs):
        out = real(input_ids=input_ids, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        calls.append((input_ids.shape[1], sequences.shape[1] - input_ids.shape[1]))
        return out

    policy.model.generate = generate
    return calls


def test_context_never_exceeds_the_window_and_drops_the_oldest_turns_first():
    policy = LocalPolicy("hpl-tiny", max_context=600, max_new_tokens=16)
    messages = conversation(turns=12)
    full = policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert len(policy.tokenizer(full)["input_ids"]) > 600  # the conversation does not fit as it is

    text = policy.tokenizer.decode(policy.prompt_ids(messages))
    assert len(policy.prompt_ids(messages)) <= 600 - 16
    for m in HEAD:
        assert m["content"] in text  # the task statement and instructions are kept
    kept = [t for t in range(12) if f"obs{t} " in text]
    assert kept and kept == list(range(12 - len(kept), 12)) and len(kept) < 12  # a suffix: the oldest went first
    assert all((f"thing{t}." in text) == (t in kept) for t in range(12))  # whole turns: action with observation

    calls = spy_on_generate(policy)
    policy.generate([messages, conversation(turns=3)])
    assert calls and all(prompt + new <= 600 for prompt, new in calls)


def test_cut_turns_are_the_turns_whose_prompt_the_policy_cut(tmp_path, capsys):
    policy = LocalPolicy("hpl-tiny", max_context=600, max_new_tokens=16)
    messages = conversation(turns=12)
    record = EpisodeRecord("t/1", "boil", 0.0, False, 12, [], [], messages)
    cut = cut_turns(record, policy.tokenizer, 600 - 16)
    # what the policy did at each turn: the prompt is the whole conversation so far, or it dropped turns
    at = [i for i, m in enumerate(messages) if i >= len(HEAD) and m["role"] == "assistant"]
    def whole(conversation):  # the prompt uncut
        text = policy.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return policy.tokenizer(text, add_special_tokens=False)["input_ids"]

    dropped = [policy.prompt_ids(messages[:i]) != whole(messages[:i]) for i in at]
    assert len(cut) == 12 and cut == dropped and 0 < sum(cut) < 12  # the early turns fit, the late ones do not

    path = tmp_path / "episodes.jsonl"
    write_jsonl(path, [asdict(record)])
    counts = window([str(path)], model="hpl-tiny", max_context=600, max_new_tokens=16)
    assert counts == {"boil": [12, sum(cut)], "all": [12, sum(cut)]}
    assert f"boil: {sum(cut)} of 12" in capsys.readouterr().out


def test_the_default_window_is_the_models_and_a_huge_observation_is_cut_in_the_middle():
    policy = LocalPolicy("hpl-tiny", max_new_tokens=16)
    assert policy.max_context == policy.model.config.max_position_embeddings == 8192
    messages = conversation(turns=1, observation_words=9000)
    messages[-1] = {"role": "user", "content": messages[-1]["content"] + " the end is near"}
    ids = policy.prompt_ids(messages)
    assert len(ids) <= 8192 - 16
    text = policy.tokenizer.decode(ids)
    assert HEAD[2]["content"] in text and text.rstrip().endswith("assistant")  # generation prompt last
    assert "the end is near" in text  # the newest tokens stay


def test_a_turn_ends_at_the_end_of_turn_token():
    policy = LocalPolicy("hpl-tiny", max_new_tokens=50)
    end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in policy.eos_token_ids
    force_next_token(policy, end)
    calls = spy_on_generate(policy)
    assert policy.generate([conversation(turns=1)]) == [""]
    assert [new for _, new in calls] == [1]  # stopped at once, not after max_new_tokens


def test_a_turn_ends_at_a_stop_string():
    policy = LocalPolicy("hpl-tiny", max_new_tokens=50, stop=["\n"])
    force_next_token(policy, policy.tokenizer("\n", add_special_tokens=False)["input_ids"][0])
    calls = spy_on_generate(policy)
    assert policy.generate([conversation(turns=1)]) == [""]  # the stop string itself is cut
    assert [new for _, new in calls] == [1]


def force_next_token(policy: LocalPolicy, token: int) -> None:
    """Replaces the LM head by one that always predicts ``token``."""
    head = torch.nn.Linear(policy.model.config.hidden_size, policy.model.config.vocab_size)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token] = 10.0
    policy.model.lm_head = head
