"""Export a trained policy from a Lightning checkpoint as a Hugging Face model directory.

``hpl-export --ckpt runs/.../last.ckpt --output exported/`` writes weights, config and tokenizer,
loadable with ``AutoModelForCausalLM.from_pretrained(output)``. A LoRA policy is merged into its base by default, or
saved as a peft adapter with ``--merge_lora false`` (load it with ``peft.AutoPeftModelForCausalLM``).
"""

from __future__ import annotations

from pathlib import Path

from hpl_lightning.console import ShortErrorParser, one_line_errors
from hpl_lightning.errors import UsageError
from hpl_lightning.models import load_tokenizer
from hpl_lightning.module import HPLModule


def export(ckpt: str, output: str, merge_lora: bool = True) -> Path:
    """Loads ``ckpt`` (policy weights; the frozen parts come from the configured model) and saves the policy."""
    if not Path(ckpt).is_file():
        raise UsageError(f"--ckpt {ckpt}: no such file")
    module = HPLModule.load_from_checkpoint(ckpt, map_location="cpu")
    policy = module.policy
    if module.lora is not None and merge_lora:
        policy = policy.merge_and_unload()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(out)
    load_tokenizer(module.hparams.policy).save_pretrained(out)
    print(f"exported the policy of {ckpt} to {out}")
    return out


def main(args: list[str] | None = None) -> None:
    """``hpl-export``."""
    from jsonargparse import CLI

    with one_line_errors(FileNotFoundError):
        CLI(export, as_positional=False, parser_class=ShortErrorParser, args=args)


if __name__ == "__main__":
    main()
