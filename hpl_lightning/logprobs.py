"""Token log-probs and entropies of a causal LM with the LM head applied only where they are needed.

A plain forward projects every position onto the vocabulary: ``[T, V]`` logits, 2.4 GB in fp32 for 4k tokens of
Qwen2.5's 151,936-token vocabulary, most of them for observation and instruction tokens that are never scored. Here
the model's own forward runs with no logits kept (so peft, FSDP and gradient-checkpointing hooks apply as usual), the
final hidden states are read from the decoder's output, and the head runs on the needed positions only, in chunks of
at most ``CHUNK_LOGITS`` logits. Under autograd a chunk is recomputed in backward (activation checkpointing) when there
is more than one, so no more than one chunk of logits exists at a time whatever the vocabulary.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_LOGITS = 1 << 24  # logits per chunk: 64 MiB in fp32 (110 positions of a 152k vocabulary, 8k of a 2k one)


def final_hidden_states(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """The decoder's output ``[R, W, H]`` (after the final norm) from the model's forward with no logits kept."""
    captured: list[torch.Tensor] = []

    def keep_output(module, args, output) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
    handle = model.get_decoder().register_forward_hook(keep_output)
    try:
        model(**inputs, logits_to_keep=no_position, use_cache=False)
    finally:
        handle.remove()
    return captured[-1]


def token_logps(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(labels[k] | hidden[k])`` in float32 for ``hidden`` ``[K, H]``; differentiable, chunked over K."""

    def chunk_logps(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = _logits(model, h)
        return logits.gather(-1, y[:, None])[:, 0] - logits.logsumexp(-1)

    return _chunked(model, chunk_logps, hidden, labels)


@torch.no_grad()
def token_entropies(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Entropy (nats, float32) of the next-token distribution at each row of ``hidden`` ``[K, H]``, chunked over K."""

    def chunk_entropies(h: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(_logits(model, h), -1)
        return -(logp.exp() * logp).sum(-1)

    return _chunked(model, chunk_entropies, hidden)


def _chunked(model: torch.nn.Module, fn: Callable[..., torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
    size = max(1, CHUNK_LOGITS // model.config.get_text_config().vocab_size)
    if len(rows[0]) <= size:
        return fn(*rows)
    recompute = torch.is_grad_enabled()
    parts = [
        checkpoint(fn, *chunk, use_reentrant=False, preserve_rng_state=False) if recompute else fn(*chunk)
        for chunk in zip(*(r.split(size) for r in rows))
    ]
    return torch.cat(parts)


def _logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits as the model's forward makes them: its head, then Gemma-style soft-capping if configured."""
    config = model.config.get_text_config()
    for name in ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"{config.model_type}: logits scaled by config.{name} are not supported")
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap
