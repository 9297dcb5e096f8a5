"""The LM head only where needed: scored-only (and chunked) log-probs and entropies equal those of full logits, in
values and gradients (fp32, tiny model), per-pair, packed, and under LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpl_lightning import logprobs
from hpl_lightning.data import collate
from hpl_lightning.losses import preference_loss
from hpl_lightning.models import LoraSettings, load_tokenizer
from hpl_lightning.module import HPLModule
from hpl_lightning.pipeline import action_entropies
from hpl_lightning.policies import LocalPolicy
from hpl_lightning.schema import parse_pair, parse_trajectory
from hpl_lightning.segmentation import action_indices
from hpl_lightning.tokenization import ChatTokenizer, TokenizationReport
from tests.synthetic import make_records


def _batch(packing: bool) -> dict:
    chat = ChatTokenizer(load_tokenizer("hpl-tiny"), 4096)
    report = TokenizationReport()
    records = make_records(n_tasks=1, seed=1)
    examples = [
        chat(parse_trajectory(r) if "messages" in r else parse_pair(r), report, "mem", i)
        for i, r in enumerate(records, 1)
    ]
    return collate([(ex, False) for ex in examples], 0, packing=packing)


def _full_logits_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The former per-pair computation: ``[B, T, V]`` logits, log-softmax over every position, masked sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    token_logps = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return (token_logps.double() * batch["scored"][:, 1:]).sum(-1)


def _loss(logps: torch.Tensor, n: int, n_tokens: torch.Tensor) -> torch.Tensor:
    """DPO on the pairs (any fixed reference) plus per-token behaviour cloning on the trajectories, as in training."""
    ref = logps.detach() - 0.5
    dpo = preference_loss(logps[:n], logps[n : 2 * n], ref[:n], ref[n : 2 * n], 0.3).losses.mean()
    return dpo - logps[2 * n :].sum() / n_tokens[2 * n :].sum()


@pytest.mark.parametrize(
    "packing, lora, chunk_logits",
    # the default: one chunk (tiny vocabulary); 50-position chunks: recomputed in backward (checkpointed)
    [
        (False, False, logprobs.CHUNK_LOGITS),
        (False, False, 2048 * 50),
        (True, False, 2048 * 50),
        (False, True, 2048 * 50),
    ],
)
def test_scored_only_logps_equal_full_logits_in_loss_and_gradient(monkeypatch, packing, lora, chunk_logits):
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", chunk_logits)
    lora_settings = LoraSettings(dropout=0.0) if lora else None
    module = HPLModule(policy="hpl-tiny", init_seed=3, packing=packing, lora=lora_settings)
    module.configure_model()
    model = module.policy.eval()  # no dropout: both computations see the same function
    params = [p for p in model.parameters() if p.requires_grad]
    per_pair, batch = _batch(False), _batch(packing)
    n = batch["n_pairs"]

    logps, n_tokens, token_logps = HPLModule.sequence_logps(model, batch, sum_dtype=torch.float64)
    loss = _loss(logps, n, n_tokens)
    grads = torch.autograd.grad(loss, params)
    expected = _full_logits_logps(model, per_pair)
    expected_loss = _loss(expected, n, n_tokens)
    expected_grads = torch.autograd.grad(expected_loss, params)

    assert torch.equal(n_tokens, per_pair["scored"][:, 1:].sum(-1))
    assert len(token_logps) == (int(n_tokens.sum()) if not packing else len(batch["target_label"]))
    torch.testing.assert_close(logps, expected, atol=0, rtol=1e-6)
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=0)
    for p, g, e in zip(params, grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-6 * max(1.0, e.abs().max().item()), rtol=1e-6)


def test_head_runs_on_scored_positions_only(monkeypatch):
    module = HPLModule(policy="hpl-tiny", init_seed=3)
    module.configure_model()
    batch = _batch(False)
    rows = []
    head = module.policy.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, a, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0]))
    try:
        HPLModule.sequence_logps(module.policy, batch)
    finally:
        handle.remove()
    assert sum(rows) == int(batch["scored"][:, 1:].sum()) < batch["input_ids"].numel() / 2


@pytest.mark.parametrize("chunk_logits", [logprobs.CHUNK_LOGITS, 2048 * 5])
def test_action_entropies_equal_full_logits(monkeypatch, chunk_logits):
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", chunk_logits)
    policy = LocalPolicy("hpl-tiny", seed=3)
    trajectory = parse_trajectory(next(r for r in make_records(n_tasks=1, seed=1) if "messages" in r))
    got = action_entropies(policy, trajectory)

    chat = ChatTokenizer(policy.tokenizer, 4096)
    messages = trajectory.messages
    enc = policy.tokenizer(chat.render(messages), add_special_tokens=False, return_offsets_mapping=True)
    with torch.no_grad():
        logp = torch.log_softmax(policy.model(torch.tensor([enc["input_ids"]])).logits[0].float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    expected = []
    for i in action_indices(messages):
        a, b = len(chat.render(messages[:i], add_generation_prompt=True)), len(chat.render(messages[: i + 1]))
        positions = [j - 1 for j, (start, _) in enumerate(enc["offset_mapping"]) if a <= start < b and j >= 1]
        expected.append(float(entropy[positions].mean()))
    assert len(got) == len(expected) > 1
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-6, rtol=0)


def test_action_entropies_of_a_long_conversation_in_windows(monkeypatch):
    """Past max_length: several forwards, each within max_length and starting with the task statement; every
    action scored once; an action whose whole prefix fits gets the value the unwindowed computation gives."""
    import hpl_lightning.pipeline as pipeline

    policy = LocalPolicy("hpl-tiny", seed=3)
    head = [{"role": "user", "content": "You are an agent."}, {"role": "assistant", "content": "OK"},
            {"role": "user", "content": "Task: count the singers"}]
    turns = [m for i in range(24) for m in ({"role": "assistant", "content": f"Action: execute[select {i} from t{i}]"},
                                             {"role": "user", "content": f"Observation: {i * 7} rows in t{i}"})]
    trajectory = parse_trajectory({"id": "long", "task": "t", "messages": head + turns, "reward": 1.0})
    chat = ChatTokenizer(policy.tokenizer, 4096)

    def n_tokens(messages: list) -> int:
        return len(policy.tokenizer(chat.render(messages), add_special_tokens=False)["input_ids"])

    total = n_tokens(trajectory.messages)
    max_length = total // 3
    head_ids = policy.tokenizer(chat.render(head), add_special_tokens=False)["input_ids"]
    forwards = []
    real = pipeline.final_hidden_states

    def spy(model, input_ids):
        forwards.append(input_ids[0].tolist())
        return real(model, input_ids=input_ids)

    full = action_entropies(policy, trajectory, max_length=4 * total)
    monkeypatch.setattr(pipeline, "final_hidden_states", spy)
    got = action_entropies(policy, trajectory, max_length=max_length)
    assert len(got) == len(full) == 24 and len(forwards) >= 3
    assert all(len(ids) <= max_length and ids[: len(head_ids) - 1] == head_ids[:-1] for ids in forwards)
    at = action_indices(trajectory.messages)
    fits = [k for k in range(24) if n_tokens(trajectory.messages[: at[k] + 1]) <= max_length]
    assert 0 < len(fits) < 24
    torch.testing.assert_close(torch.tensor(got)[fits], torch.tensor(full)[fits], atol=1e-6, rtol=0)
    assert got != full  # the actions after the first window see a shorter history
