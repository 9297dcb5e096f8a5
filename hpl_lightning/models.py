"""Model and tokenizer loading: one code path for a hub name, a local checkpoint, and the bundled tiny config.

A directory holding a ``config.json`` but no weight files is initialised from that config with a fixed seed, which
is how the quickstart and the tests run on a machine without hub access (``hpl-tiny`` names the bundled one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

TINY_MODEL = Path(__file__).parent / "assets" / "tiny-qwen2"
Quantization = Literal["none", "4bit", "8bit"]
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


@dataclass
class LoraSettings:
    """peft LoRA adapter on the policy; ``target_modules`` 'all-linear' adapts every linear layer but the head."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    extra: dict = field(default_factory=dict)  # any other peft.LoraConfig argument


def resolve(spec: str) -> str:
    return str(TINY_MODEL) if spec == "hpl-tiny" else spec


def is_config_only(spec: str) -> bool:
    path = Path(resolve(spec))
    return (path / "config.json").is_file() and not any(
        next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS
    )


def load_tokenizer(spec: str):
    tokenizer = AutoTokenizer.from_pretrained(resolve(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    spec: str,
    dtype: str = "float32",
    quantization: Quantization = "none",
    seed: int = 0,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A causal LM from a hub name, a local path, or a config-only directory (initialised with ``seed``)."""
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if is_config_only(spec):
        if quantization != "none":
            raise ValueError("quantization needs pretrained weights; a config-only model has none")
        config = AutoConfig.from_pretrained(resolve(spec))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **kwargs)
    if quantization != "none":
        from transformers import BitsAndBytesConfig  # imports bitsandbytes, which is noisy on CPU-only machines

        compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit",
            load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
        )
    return AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=torch_dtype, **kwargs)


def apply_lora(model: PreTrainedModel, settings: LoraSettings, quantized: bool, gradient_checkpointing: bool):
    """Wraps ``model`` with a fresh LoRA adapter (preparing k-bit weights for training when quantized)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
        **settings.extra,
    )
    return get_peft_model(model, config)
