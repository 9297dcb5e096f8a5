"""Multi-turn scoring: only the agent's own tokens count; observations are context and get no gradient."""

from __future__ import annotations

import pytest
import torch

from hpl_lightning.data import collate
from hpl_lightning.models import TINY_MODEL, load_tokenizer
from hpl_lightning.module import HPLModule, LossWeights
from hpl_lightning.schema import parse_pair, parse_trajectory
from hpl_lightning.tokenization import ChatTokenizer, TokenizationReport

HEAD = [
    {"role": "user", "content": "You are a SQL agent."},
    {"role": "assistant", "content": "OK"},
    {"role": "user", "content": "How many singers are there?"},
]
PREFIX = [
    {"role": "assistant", "content": "Thought: look at tables\nAction: execute[SHOW TABLES]"},
    {"role": "user", "content": "Observation: [('singer',), ('concert',)]"},
]
CHOSEN = [
    {"role": "assistant", "content": "Thought: count them\nAction: execute[SELECT count(*) FROM singer]"},
    {"role": "user", "content": "Observation: [(6,)]"},
    {"role": "assistant", "content": "Action: submit"},
]
REJECTED = [
    {"role": "assistant", "content": "Action: execute[SELECT * FROM concert]"},
    {"role": "user", "content": "Observation: [(1, 'Auditions', 2014)]"},
    {"role": "assistant", "content": "Action: execute[DROP TABLE singer]"},
]


def _group_pair():
    return parse_pair({
        "id": "g", "task_id": "t", "level": "group", "prompt": HEAD + PREFIX, "chosen": CHOSEN,
        "rejected": REJECTED, "chosen_reward": 1.0, "rejected_reward": 0.0, "group_length": 2, "difficulty": 1.0,
    })


def _runs(ids: list[int], scored: list[bool], tokenizer) -> list[str]:
    """Decoded text of each maximal run of scored tokens."""
    runs, current = [], []
    for token, flag in zip(ids + [None], scored + [False]):
        if flag:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_scored_tokens_are_exactly_the_agent_turns_of_the_continuation():
    tokenizer = load_tokenizer(str(TINY_MODEL))
    example = ChatTokenizer(tokenizer, 4096)(_group_pair(), TokenizationReport(), "mem", 1)
    for seq, turns in ((example.chosen, CHOSEN), (example.rejected, REJECTED)):
        expected = [m["content"] + "<|im_end|>\n" for m in turns if m["role"] == "assistant"]
        assert _runs(seq.input_ids, seq.scored, tokenizer) == expected  # prefix actions and observations excluded


def test_group_logps_are_the_sum_over_exactly_their_agent_tokens_and_observations_get_no_gradient():
    tokenizer = load_tokenizer(str(TINY_MODEL))
    chat = ChatTokenizer(tokenizer, 4096)
    report = TokenizationReport()
    pair = chat(_group_pair(), report, "mem", 1)
    expert = chat(parse_trajectory({"id": "e", "task": "sql", "messages": HEAD + PREFIX + CHOSEN, "reward": 1.0}),
                  report, "mem", 2)
    batch = collate([(pair, False), (expert, False)], tokenizer.pad_token_id)

    module = HPLModule(policy=str(TINY_MODEL), init_seed=3)
    module.configure_model()
    captured = {}

    def keep_hidden(_module, _inputs, output):  # the final hidden states: position t feeds only the head at t
        output.last_hidden_state.retain_grad()
        captured["hidden"] = output.last_hidden_state

    module.policy.get_decoder().register_forward_hook(keep_hidden)
    logps, n_tokens, _ = module.sequence_logps(module.policy, batch)

    # independent recomputation: full logits, log-softmax over the vocabulary, gathered at the agent tokens only
    with torch.no_grad():
        logits = module.policy.lm_head(captured["hidden"])
    for row, seq in enumerate((pair.chosen, pair.rejected, expert.chosen)):
        ids = torch.tensor(seq.input_ids)
        token_logps = torch.log_softmax(logits[row, : len(ids) - 1], -1).gather(1, ids[1:, None])[:, 0]
        mask = torch.tensor(seq.scored[1:])
        assert torch.allclose(logps[row], token_logps[mask].sum(), atol=1e-4)
        assert n_tokens[row] == mask.sum()

    # the full objective (DPO + BC on the expert trajectory) back-propagated to the final hidden states
    module._step(batch, "val").backward()
    grad = captured["hidden"].grad.abs().sum(-1)  # [rows, positions]; position t predicts token t+1
    for row in range(3):
        predicts_scored = batch["scored"][row, 1:]
        assert (grad[row, :-1][~predicts_scored] == 0).all(), "a context token received gradient"
        assert (grad[row, :-1][predicts_scored] > 0).all()


@pytest.mark.parametrize("bc_on_chosen", [False, True])
def test_bc_is_the_expert_trajectories_nll_and_the_chosen_side_only_as_an_option(bc_on_chosen):
    """Default L_BC: the paper's Eq. 1, NLL of the expert trajectories (a mean over their agent tokens); IPR's NLL
    of each pair's chosen side joins it only with ``bc_on_chosen``."""
    tokenizer = load_tokenizer(str(TINY_MODEL))
    chat, report = ChatTokenizer(tokenizer, 4096), TokenizationReport()
    pair = chat(_group_pair(), report, "mem", 1)
    expert = chat(parse_trajectory({"id": "e", "task": "sql", "messages": HEAD + PREFIX + CHOSEN, "reward": 1.0}),
                  report, "mem", 2)
    batch = collate([(pair, False), (expert, False)], tokenizer.pad_token_id)
    kwargs = {"bc_on_chosen": True} if bc_on_chosen else {}  # the default is off
    module = HPLModule(policy=str(TINY_MODEL), init_seed=3, weights=LossWeights(bc=1.0, traj=0.0, step=0.0, group=0.0),
                       **kwargs)
    module.configure_model()
    with torch.no_grad():
        logps, n_tokens, _ = module.sequence_logps(module.policy, batch, sum_dtype=torch.float64)
        rows = [2, 0] if bc_on_chosen else [2]  # rows: chosen, rejected, expert
        expected = -logps[rows].sum() / n_tokens[rows].sum()
        assert module._step(batch, "val").item() == pytest.approx(expected.item(), rel=1e-6)
