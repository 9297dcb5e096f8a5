"""LoRA and QLoRA (4-bit nf4 via bitsandbytes, which trains on CPU too): the reference is the base with adapters
disabled, checkpoints hold the adapter only, export merges it."""

from __future__ import annotations

import pytest
import torch

from hpl_lightning.cli import HPLCLI
from hpl_lightning.data import HPLDataModule
from hpl_lightning.export import export
from hpl_lightning.module import HPLModule
from tests.synthetic import make_records, write_jsonl
from tests.tiny import save_tiny_checkpoint

pytestmark = pytest.mark.slow


def _fit(tmp_path, base, *extra):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=2))
    return HPLCLI(
        HPLModule, HPLDataModule, seed_everything_default=0, save_config_kwargs={"overwrite": True},
        args=["fit", f"--model.policy={base}", "--model.lora.r=4", "--model.lora.alpha=8", "--model.optim.lr=1e-2",
              f"--data.train_path={train}", "--data.max_length=512", "--trainer.max_steps=3",
              "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
              f"--trainer.logger.init_args.save_dir={tmp_path}",
              f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}", *extra],
    )


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_lora_fit_checkpoint_and_export(tmp_path, quantization):
    base = save_tiny_checkpoint(tmp_path / "base", seed=5)
    cli = _fit(tmp_path, base, f"--model.quantization={quantization}")
    module = cli.model
    assert module.reference is None  # no second copy: the reference is the base with adapters disabled
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    if quantization == "4bit":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.policy.modules())

    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state)  # adapter-only checkpoint
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # the adapter was trained

    # reference = base: with adapters disabled the policy scores exactly like the untouched base checkpoint
    if quantization == "none":
        from transformers import AutoModelForCausalLM

        ids = torch.tensor([[5, 17, 99, 240, 31]])
        untouched = AutoModelForCausalLM.from_pretrained(base).eval()
        module.policy.eval()
        with torch.no_grad(), module.policy.disable_adapter():
            assert torch.allclose(module.policy(input_ids=ids).logits, untouched(input_ids=ids).logits, atol=1e-6)

        out = export(str(tmp_path / "ckpt" / "last.ckpt"), str(tmp_path / "exported"))
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            assert torch.allclose(merged(input_ids=ids).logits, module.policy(input_ids=ids).logits, atol=1e-5)
