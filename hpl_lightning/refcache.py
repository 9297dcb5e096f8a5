"""Reference log-probs computed once and stored on disk, keyed by data identity and reference identity.

The reference model is frozen, so its log-probs of a pair never change: one pass before training replaces a forward
per step, and training then runs without the reference in memory. A cache file is named by a hash of the tokenized
examples (token ids, scored masks, order) and a hash of the reference's identity; a change to either names another
file, so stale values are never read (the old file is left in place, the new one computed with a message).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from hpl_lightning.models import is_config_only, resolve
from hpl_lightning.tokenization import Example

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def data_fingerprint(examples: Sequence[Example]) -> str:
    """Hash of what the reference scores: every sequence's token ids and scored mask, in order."""
    h = hashlib.sha256()
    for ex in examples:
        for seq in (ex.chosen, ex.rejected):
            if seq is None:
                h.update(b"none")
                continue
            h.update(torch.tensor(seq.input_ids, dtype=torch.int64).numpy().tobytes())
            h.update(bytes(seq.scored))
            h.update(b"|")
    return h.hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a loaded model's weights (used when the reference is the policy's starting point)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def spec_fingerprint(spec: str, settings: dict) -> str:
    """Identity of a reference that is not loaded: ``settings`` (dtype, quantization, ...) plus its checkpoint.

    A local directory: its config and the bytes of its weight files (read, not loaded into a model); a config-only
    directory: its config (``settings`` holds the init seed); a hub name: the cached snapshot's commit and config.
    """
    path = Path(resolve(spec))
    h = hashlib.sha256(json.dumps({"spec": spec, **settings}, sort_keys=True).encode())
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec, allow_patterns=["config.json"]))
        h.update(path.name.encode())  # the snapshot directory is named by the commit
    h.update((path / "config.json").read_bytes())
    if not is_config_only(str(path)):
        for f in sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES):
            h.update(f.name.encode())
            with f.open("rb") as stream:
                while chunk := stream.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()[:16]


def cache_path(directory: str | Path, data_fp: str, reference_fp: str) -> Path:
    return Path(directory) / f"reflogps-data{data_fp}-ref{reference_fp}.pt"


def save(path: Path, values: torch.Tensor) -> None:
    """Atomic write (several ranks may compute the same file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(values, tmp)
    os.replace(tmp, path)


def attach(examples: Sequence[Example], values: torch.Tensor) -> list[Example]:
    """``examples`` with their cached (chosen, rejected) reference log-probs; ``values`` is ``[n, 2]`` float64,
    NaN for behaviour-cloning items."""
    if len(values) != len(examples):
        raise ValueError(f"reference cache holds {len(values)} rows for {len(examples)} examples")
    return [
        ex if ex.rejected is None else replace(ex, ref_logps=(float(c), float(r)))
        for ex, (c, r) in zip(examples, values.tolist())
    ]
