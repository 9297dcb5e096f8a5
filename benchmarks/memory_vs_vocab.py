"""Peak memory of one DPO training step vs the vocabulary size: HPLModule vs TRL's DPOTrainer, same pairs.

One step = policy forward and backward, reference forward, optimizer step (AdamW), on the same ``--batch-size``
trajectory pairs (the bundled InterCode-SQL data, tiny tokenizer, so the token ids and lengths are identical at
every V) with a small Qwen2 (hidden 256, 4 layers, tied embeddings) whose vocabulary is 2,048, 49,152 and 151,936.
Memory is counted as live tensor bytes: the weights (both models) plus the peak of the storages the step allocates
(activations, logits, temporaries, gradients, AdamW state), counted by a dispatch mode. Gradients and AdamW state
of the embedding grow with V on both sides alike (3 x V x 256 x 4 bytes: 144 MiB at V=49k, 445 MiB at V=152k).
Last line: ``ratio: <TRL peak / our peak at the largest V>``.

    python benchmarks/memory_vs_vocab.py [--batch-size 2] [--vocabs tiny smollm2 qwen2.5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from benchmarks.common import QUICKSTART, VOCABS, read_records, small_qwen2  # noqa: E402

MiB = 1 << 20


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created while active and still alive, and their peak: what the step allocates
    (activations, logits, temporaries, gradients, optimizer state) on top of the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self.seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _peak(models: list[torch.nn.Module], step) -> dict[str, float]:
    weights = sum(t.nbytes for m in models for t in [*m.parameters(), *m.buffers()])
    with _LiveBytes() as tracker:
        step()
    return {"total": (weights + tracker.peak) / MiB, "transient": tracker.peak / MiB}


def ours(model: Path, records: list[dict], batch_size: int, max_length: int) -> dict[str, float]:
    from hpl_lightning.data import collate
    from hpl_lightning.models import load_tokenizer
    from hpl_lightning.module import HPLModule
    from hpl_lightning.schema import parse_pair
    from hpl_lightning.tokenization import ChatTokenizer, TokenizationReport

    chat, report = ChatTokenizer(load_tokenizer(str(model)), max_length), TokenizationReport()
    batch = collate([(chat(parse_pair(r), report, "mem", i), False) for i, r in enumerate(records[:batch_size])], 0)
    module = HPLModule(policy=str(model), beta=0.3)
    module.configure_model()
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=1e-6)

    def step() -> None:
        module._step(batch, "val").backward()
        optimizer.step()
        optimizer.zero_grad()

    return _peak([module.policy, module.reference], step)


def trl(model: Path, records: list[dict], batch_size: int, max_length: int, workdir: Path) -> dict[str, float]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records[:batch_size]]
    config = DPOConfig(
        output_dir=str(workdir), beta=0.3, learning_rate=1e-6, use_cpu=True, bf16=False, report_to=[],
        per_device_train_batch_size=batch_size, max_length=max_length, gradient_checkpointing=False,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), args=config,
        train_dataset=datasets.Dataset.from_list(pairs), processing_class=AutoTokenizer.from_pretrained(model),
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=1e-6)

    def step() -> None:
        trainer.compute_loss(trainer.model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()

    return _peak([trainer.model, trainer.ref_model], step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--vocabs", nargs="+", choices=sorted(VOCABS), default=["tiny", "smollm2", "qwen2.5"])
    args = parser.parse_args()
    records = [r for r in read_records(QUICKSTART) if r.get("level") == "trajectory"]
    print(f"{args.batch_size} trajectory pairs, max_length {args.max_length}, fp32 CPU, load {os.getloadavg()[0]:.1f}")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocabs:
            model = small_qwen2(Path(tmp) / vocab, vocab=vocab)
            result[vocab] = {"ours": ours(model, records, args.batch_size, args.max_length),
                             "trl": trl(model, records, args.batch_size, args.max_length, Path(tmp) / "trl")}
            o, t = result[vocab]["ours"], result[vocab]["trl"]
            print(f"V={VOCABS[vocab]:>7}: peak ours {o['total']:7.0f} MiB (allocated by the step "
                  f"{o['transient']:6.0f}), TRL {t['total']:7.0f} MiB ({t['transient']:6.0f})", flush=True)
    first, last = result[args.vocabs[0]]["ours"], result[args.vocabs[-1]]["ours"]
    print(f"ours from V={VOCABS[args.vocabs[0]]} to {VOCABS[args.vocabs[-1]]}: allocated by the step "
          f"x{last['transient'] / first['transient']:.2f}")
    print(f"ratio: {result[args.vocabs[-1]]['trl']['total'] / last['total']:.4f}")


if __name__ == "__main__":
    main()
