"""Shared-prefix packing is an exact re-layout: packed and per-pair losses and gradients agree (fp32, tiny model;
SDPA, and FlexAttention's BlockMask), and agree to bf16 rounding under bf16-mixed."""

from __future__ import annotations

import random

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.plugins.precision import MixedPrecision

from hpl_lightning.data import collate
from hpl_lightning.models import load_tokenizer
from hpl_lightning.module import HPLModule
from hpl_lightning.packing import pack
from hpl_lightning.schema import parse_pair, parse_trajectory
from hpl_lightning.tokenization import ChatTokenizer, Example, TokenizationReport
from tests.synthetic import make_records
from tests.tiny import save_tiny_checkpoint

QUICKSTART = "data/quickstart/train.jsonl"


def _examples(records: list[dict]) -> list[Example]:
    chat = ChatTokenizer(load_tokenizer("hpl-tiny"), 4096)
    report = TokenizationReport()
    parse = lambda r: parse_trajectory(r) if "messages" in r else parse_pair(r)  # noqa: E731
    return [chat(parse(r), report, "mem", i) for i, r in enumerate(records, 1)]


def _quickstart_records(n_tasks: int) -> list[dict]:
    import json

    records = [json.loads(line) for line in open(QUICKSTART)]
    tasks = sorted({r["task_id"] for r in records if "task_id" in r})[:n_tasks]
    experts = {f"{t}/expert" for t in tasks}
    return [r for r in records if r.get("task_id") in tasks or r["id"] in experts]


def _loss_and_grads(module: HPLModule, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.policy.zero_grad()
    loss = module._step(batch, "val")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("ref"), seed=2))


@pytest.mark.parametrize("source", ["synthetic", "quickstart"])
@pytest.mark.parametrize("row_tokens", [None, 600])
def test_packed_loss_and_gradients_equal_per_pair(reference, source, row_tokens):
    records = make_records(n_tasks=2, seed=1) if source == "synthetic" else _quickstart_records(2)
    examples = _examples(records)
    assert {ex.level for ex in examples} == {"trajectory", "step", "group", "bc"}
    items = [(ex, False) for ex in random.Random(0).sample(examples, len(examples))]
    modules = {}
    for packing in (False, True):
        module = HPLModule(policy="hpl-tiny", reference=reference, init_seed=3, packing=packing)
        module.configure_model()
        modules[packing] = module
    per_pair = collate(items, 0)
    packed = collate(items, 0, packing=True, pack_row_tokens=row_tokens)
    if row_tokens is not None:
        assert packed["input_ids"].shape[0] > 1  # the budget splits the batch into several tree rows

    logps, n_tokens, _ = HPLModule.sequence_logps(modules[False].policy, per_pair, sum_dtype=torch.float64)
    packed_logps, packed_n_tokens, _ = HPLModule.sequence_logps(modules[True].policy, packed, sum_dtype=torch.float64)
    assert torch.equal(n_tokens, packed_n_tokens)
    torch.testing.assert_close(packed_logps, logps, atol=0, rtol=1e-6)  # sums of ~100s of tokens: fp32 ulps

    loss, grads = _loss_and_grads(modules[False], per_pair)
    packed_loss, packed_grads = _loss_and_grads(modules[True], packed)
    torch.testing.assert_close(packed_loss, loss, atol=1e-5, rtol=0)
    assert loss > 0
    for name, grad in grads.items():
        # 1e-5 on the gradient's own scale: entries reach ~10 (embeddings), whose fp32 sums over thousands of
        # positions differ by ulps because packing sums fewer, shared terms in another order
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5 * scale, rtol=0, msg=name)


def test_each_distinct_prefix_is_computed_once():
    examples = _examples(make_records(n_tasks=2, seed=1))
    seqs = [s for ex in examples for s in (ex.chosen, ex.rejected) if s is not None]
    packed = pack(seqs, pad_id=0)
    distinct_prefixes = {tuple(s.input_ids[: t + 1]) for s in seqs for t in range(len(s.input_ids))}
    assert packed.input_ids.shape == (1, len(distinct_prefixes))
    assert packed.n_unique == len(distinct_prefixes)
    assert packed.n_unique < sum(len(s.input_ids) for s in seqs) / 2  # the expert trunk and head are shared


def test_chosen_that_differs_from_the_trunk_becomes_its_own_branch():
    """A step pair whose chosen is not the recorded expert continuation: nothing is shared beyond the literal prefix."""
    examples = _examples(make_records(n_tasks=1, seed=1))
    trunk = next(ex for ex in examples if ex.level == "bc").chosen
    step = next(ex for ex in examples if ex.level == "step")
    other = Example("x", "t", "step", step.rejected, step.chosen)  # swapped: chosen leaves the trunk
    for seqs in ([trunk, step.chosen, step.rejected], [trunk, other.chosen, other.rejected]):
        packed = pack(seqs, pad_id=0)
        distinct = {tuple(s.input_ids[: t + 1]) for s in seqs for t in range(len(s.input_ids))}
        assert packed.n_unique == len(distinct)


def _packed_and_per_pair(reference: str, **module_args) -> tuple[dict[bool, HPLModule], dict, dict]:
    examples = _examples(make_records(n_tasks=1, seed=1))
    items = [(ex, False) for ex in examples]
    modules = {}
    for packing in (False, True):
        args = {"attn_implementation": "sdpa", **module_args} if packing else {}
        modules[packing] = HPLModule(policy="hpl-tiny", reference=reference, init_seed=3, packing=packing, **args)
        modules[packing].configure_model()
    return modules, collate(items, 0), collate(items, 0, packing=True)


@pytest.mark.slow  # compiles flex_attention for the CPU (about 30 s idle, minutes on a loaded machine)
def test_flex_attention_packed_logps_equal_per_pair(reference):
    """The BlockMask path (``tree_block_mask``). Forward only: torch 2.13's FlexAttention has no backward on CPU."""
    modules, per_pair, packed = _packed_and_per_pair(reference, attn_implementation="flex_attention")
    assert modules[True].policy.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        logps, n_tokens, _ = HPLModule.sequence_logps(modules[False].policy, per_pair, sum_dtype=torch.float64)
        flex_logps, flex_n_tokens, _ = HPLModule.sequence_logps(modules[True].policy, packed, sum_dtype=torch.float64)
    assert torch.equal(n_tokens, flex_n_tokens)
    torch.testing.assert_close(flex_logps, logps, atol=0, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward raises NotImplementedError on CPU "
                    "(torch 2.13); benchmarks/gpu_check.sh runs this test on a GPU")
def test_flex_attention_packed_gradients_equal_per_pair(reference):
    modules, per_pair, packed = _packed_and_per_pair(reference, attn_implementation="flex_attention")
    for module in modules.values():
        module.to("cuda")
    per_pair, packed = (move_data_to_device(b, "cuda") for b in (per_pair, packed))
    loss, grads = _loss_and_grads(modules[False], per_pair)
    flex_loss, flex_grads = _loss_and_grads(modules[True], packed)
    torch.testing.assert_close(flex_loss, loss, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(flex_grads[name], grad, atol=1e-4 * scale, rtol=0, msg=name)  # TF32/kernel order


def test_packed_and_per_pair_agree_under_bf16_mixed(reference):
    """bf16-mixed (Lightning's autocast): bf16 keeps 8 mantissa bits, so the two layouts, which sum attention over
    different key sets in another order, agree to bf16 rounding, not exactly. Tolerances are ~3x what was measured
    (sequence log-probs 1.4e-5 relative, loss 2.4e-3 of 9.4, gradients 1.6% of their scale): log-probs 1e-4
    relative, loss 1e-2, each gradient 5% of its own largest entry."""
    modules, per_pair, packed = _packed_and_per_pair(reference)
    with MixedPrecision("bf16-mixed", "cpu").forward_context():
        logps, _, _ = HPLModule.sequence_logps(modules[False].policy, per_pair, sum_dtype=torch.float64)
        packed_logps, _, _ = HPLModule.sequence_logps(modules[True].policy, packed, sum_dtype=torch.float64)
        loss, grads = _loss_and_grads(modules[False], per_pair)
        packed_loss, packed_grads = _loss_and_grads(modules[True], packed)
    torch.testing.assert_close(packed_logps, logps, atol=0, rtol=1e-4)
    torch.testing.assert_close(packed_loss, loss, atol=1e-2, rtol=0)
    for name, grad in grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(packed_grads[name], grad, atol=5e-2 * scale, rtol=0, msg=name)
