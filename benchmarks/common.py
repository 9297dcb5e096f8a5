"""Shared pieces of the benchmark scripts: a small real-architecture checkpoint and the bundled real data."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from transformers import AutoConfig, AutoModelForCausalLM

from hpl_lightning.models import TINY_MODEL, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = [ROOT / "data" / "quickstart" / "train.jsonl", ROOT / "data" / "quickstart" / "val.jsonl"]


def small_qwen2(path: Path, hidden: int = 256, layers: int = 4, seed: int = 0) -> Path:
    """A Qwen2 checkpoint (weights + the tiny tokenizer) larger than ``hpl-tiny`` so compute, not overhead, is
    measured; both trainers load it by path like a hub model."""
    import torch

    config = AutoConfig.from_pretrained(TINY_MODEL)
    config.hidden_size, config.num_hidden_layers = hidden, layers
    config.layer_types = ["full_attention"] * layers
    config.intermediate_size, config.num_attention_heads, config.num_key_value_heads = 3 * hidden, 8, 4
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    load_tokenizer(str(TINY_MODEL)).save_pretrained(path)
    return path


def read_records(paths: list[Path]) -> list[dict]:
    return [json.loads(line) for p in paths for line in p.open() if line.strip()]


class StepTimer(Callback):
    """Wall time at the end of every training step (steady-state throughput excludes the first step)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())
