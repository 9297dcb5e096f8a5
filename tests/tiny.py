"""Tiny real-architecture checkpoints on disk, built from the bundled config: 'real' checkpoints for tests."""

from __future__ import annotations

from pathlib import Path

from hpl_lightning.models import TINY_MODEL, load_causal_lm, load_tokenizer


def save_tiny_checkpoint(path: Path, seed: int) -> Path:
    """A Qwen2 checkpoint (weights + tokenizer) loadable by name/path like any hub model."""
    model = load_causal_lm(str(TINY_MODEL), seed=seed)
    model.save_pretrained(path)
    load_tokenizer(str(TINY_MODEL)).save_pretrained(path)
    return path
