"""Sharding: FSDP2 inside ``configure_model`` (Lightning's ``ModelParallelStrategy``) and an FSDP1 strategy preset.

Both shard each transformer decoder layer as its own unit and the rest at the root, for the policy and for the frozen
reference alike: the reference is sharded like the policy (it is as large) but has no gradients nor optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy


def is_decoder_layer(module: torch.nn.Module, names: tuple[str, ...] | None = None) -> bool:
    """A transformer block: by class name, or by the Hugging Face convention ``*DecoderLayer`` when none given."""
    name = type(module).__name__
    return name in names if names else name.endswith("DecoderLayer")


def fully_shard_model(model: torch.nn.Module, mesh: Any, layer_names: tuple[str, ...] | None = None) -> None:
    """FSDP2: shard every decoder layer, then the remaining parameters (embeddings, norm, head) at the root."""
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in model.modules() if is_decoder_layer(m, layer_names)]
    if not layers:
        raise ValueError(f"no decoder layer found in {type(model).__name__}; set the layer class names")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


class DecoderLayerWrapPolicy:
    """FSDP1 auto-wrap policy: one FSDP unit per decoder layer (``recurse`` asks whether to look inside)."""

    def __init__(self, layer_names: tuple[str, ...] | None = None):
        self.layer_names = layer_names

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        return True if recurse else is_decoder_layer(module, self.layer_names)


class HPLFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` preset for HPL: decoder layers auto-wrapped, original parameters kept (the policy and the
    frozen reference share the root unit), sharded checkpoints (each rank writes its shard; no full gather)."""

    def __init__(
        self,
        layer_names: list[str] | None = None,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "sharded",
        cpu_offload: bool = False,
        limit_all_gathers: bool = True,
    ):
        super().__init__(
            auto_wrap_policy=DecoderLayerWrapPolicy(tuple(layer_names) if layer_names else None),
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            cpu_offload=cpu_offload,
            use_orig_params=True,
            limit_all_gathers=limit_all_gathers,
        )
