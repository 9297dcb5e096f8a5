"""A preference training step in float32 vs bfloat16 autocast on this CPU (``trainer.precision: bf16-mixed``):
wall time and what the lower precision does to the numbers DPO uses.

One step = the policy's forward and backward over a batch of real token sequences plus the frozen reference's
forward, as ``HPLModule.training_step`` does (without packing: the sequences here share nothing). The two settings
alternate over ``--repeats`` rounds in one process (the first side alternating too); each prints its median step
time with the spread, and the last line is ``ratio`` (median float32 time / median bfloat16 time). Accuracy: the
summed log-probability of each sequence's tokens (what a DPO log-ratio is made of) under both settings, the largest
absolute difference, and the same for the policy-minus-reference difference (the policy's weights are perturbed by
0.1% of each tensor's spread, seeded, so that the two differ as after some training: the error a DPO log-ratio
would carry).

    python benchmarks/train_precision.py --experts runs/experiments/study2-pilot/experts/*/experts.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import read_records  # noqa: E402
from hpl_lightning.models import load_causal_lm, load_tokenizer  # noqa: E402


def sequences(path: Path, tokenizer, batch: int, max_length: int) -> torch.Tensor:
    """The first ``batch`` expert trajectories as chat-template token ids, cut to the shortest of them."""
    ids = []
    for record in read_records([path])[:batch]:
        text = tokenizer.apply_chat_template(record["messages"], tokenize=False)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][:max_length])
    n = min(len(x) for x in ids)
    return torch.tensor([x[:n] for x in ids])


def token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def step(policy, reference, ids: torch.Tensor, bf16: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Seconds of one step, and the summed log-probabilities of the policy and the reference."""
    context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    policy.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with context:
        with torch.no_grad():
            ref = token_logprobs(reference, ids)
        pol = token_logprobs(policy, ids)
    pol.sum().backward()
    return time.perf_counter() - t0, pol.detach(), ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=Path, required=True, help="expert trajectories (JSONL)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    policy, reference = load_causal_lm(args.model), load_causal_lm(args.model)
    reference.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-3 * p.std() * torch.randn(p.shape, generator=generator))
    policy.train()
    ids = sequences(args.experts, tokenizer, args.batch, args.max_length)
    print(f"{args.model}: batch {ids.shape[0]} x {ids.shape[1]} tokens, {torch.get_num_threads()} threads, "
          f"{args.repeats} rounds")
    step(policy, reference, ids, bf16=False)  # warm-up of both paths (allocator, oneDNN kernels)
    step(policy, reference, ids, bf16=True)
    times: dict[bool, list[float]] = {False: [], True: []}
    out = {}
    for r in range(args.repeats):
        for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
            seconds, pol, ref = step(policy, reference, ids, bf16)
            times[bf16].append(seconds)
            out[bf16] = (pol, ref)
    for bf16, name in ((False, "float32"), (True, "bf16-mixed")):
        t = times[bf16]
        print(f"{name:>10}: step {statistics.median(t):.2f} s (range {min(t):.2f}-{max(t):.2f}), "
              f"{ids.numel() / statistics.median(t):.0f} tokens/s")
    (p32, r32), (p16, r16) = out[False], out[True]
    print(f"summed log-prob, largest |bf16 - fp32|: policy {float((p16 - p32).abs().max()):.3f}, "
          f"policy - reference {float(((p16 - r16) - (p32 - r32)).abs().max()):.4f} "
          f"(fp32 sums {[round(float(x), 1) for x in p32]})")
    print(f"ratio: {statistics.median(times[False]) / statistics.median(times[True]):.3f}")


if __name__ == "__main__":
    main()
