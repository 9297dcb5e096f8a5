"""Trajectory-level DPO throughput: ``train.py fit`` (HPLModule via LightningCLI, in-process) vs TRL's DPOTrainer.

Identical pairs (the bundled real InterCode-SQL trajectory pairs), model (a small Qwen2, hidden 256, 4 layers),
batch size, max length, optimizer steps, beta and learning rate; CPU fp32 (``--accelerator gpu``: bf16-mixed).
``--vocab`` sets the LM head's size (tiny 2,048, SmolLM2's 49,152, Qwen2.5's 151,936) and ``--tokenizer smollm2``
tokenizes with SmolLM2's real tokenizer (else the tiny one). Throughput is steady-state samples/s (steps 2..N; the
first step pays for lazy initialisation in both). The two sides alternate (``--reps`` rounds, the side that goes
first alternating too) in one process, so a load change on a shared machine hits both; each round gives a ratio ours
/ TRL, and the verdict is their median (spread: min and max). Last line: ``ratio: <median ours / TRL>``.

    python benchmarks/trl_vs_hpl.py [--vocab smollm2] [--tokenizer smollm2] [--reps 3] [--steps 6] [--packing]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import QUICKSTART, VOCABS, StepTimer, read_records, small_qwen2, smollm2_tokenizer  # noqa: E402


def run_ours(model: Path, data: Path, args: argparse.Namespace, workdir: Path) -> float:
    from hpl_lightning.cli import HPLCLI
    from hpl_lightning.data import HPLDataModule
    from hpl_lightning.module import HPLModule

    timer = StepTimer()
    HPLCLI(
        HPLModule,
        HPLDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [timer]},
        args=[
            "fit", f"--model.policy={model}", "--model.beta=0.3", f"--model.packing={args.packing}",
            f"--data.train_path={data}", f"--data.batch_size={args.batch_size}",
            f"--data.max_length={args.max_length}", "--data.curriculum.mode=static",
            f"--trainer.max_steps={args.steps}", f"--trainer.accelerator={args.accelerator}",
            f"--trainer.precision={'bf16-mixed' if args.accelerator == 'gpu' else '32-true'}",
            *([f"--model.attn_implementation={args.attn}"] if args.attn else []),
            f"--trainer.logger.init_args.save_dir={workdir}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={workdir}", f"--checkpoint.dirpath={workdir / 'ckpt'}",
            "--checkpoint.save_last=false", "--checkpoint.every_n_train_steps=0",
        ],
    )
    return (len(timer.ends) - 1) * args.batch_size / (timer.ends[-1] - timer.ends[0])


def run_trl(model: Path, pairs: list[dict], args: argparse.Namespace, workdir: Path) -> float:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ends: list[float] = []

    class Timer(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    config = DPOConfig(
        output_dir=str(workdir / "trl"), beta=0.3, learning_rate=1e-6, use_cpu=args.accelerator == "cpu",
        bf16=args.accelerator == "gpu", report_to=[],
        per_device_train_batch_size=args.batch_size, max_steps=args.steps, max_length=args.max_length,
        save_strategy="no", logging_steps=args.steps, lr_scheduler_type="cosine", warmup_steps=0.1,
        dataloader_num_workers=0, seed=0, gradient_checkpointing=False,  # TRL defaults to True; ours is off
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        args=config,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=AutoTokenizer.from_pretrained(model),
        callbacks=[Timer()],
    )
    trainer.train()
    return (len(ends) - 1) * args.batch_size / (ends[-1] - ends[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3, help="rounds of (ours, TRL), the first side alternating")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--vocab", choices=sorted(VOCABS), default="smollm2")
    parser.add_argument("--tokenizer", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--packing", action="store_true", help="our side with model.packing=true")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="gpu: both sides in bf16-mixed")
    parser.add_argument("--attn", help="our side's attn_implementation (e.g. flex_attention with --packing)")
    args = parser.parse_args()
    records = [r for r in read_records(QUICKSTART) if r.get("level") == "trajectory"]
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records]
    tokenizer = smollm2_tokenizer() if args.tokenizer == "smollm2" else None
    sides = {"ours": run_ours, "trl": run_trl}
    runs: dict[str, list[float]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = small_qwen2(workdir / "model", vocab=args.vocab, tokenizer=tokenizer)
        data = workdir / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{len(pairs)} trajectory pairs, batch {args.batch_size}, {args.steps} steps, max_length "
              f"{args.max_length}, vocab {VOCABS[args.vocab]} ({args.vocab}), tokenizer {args.tokenizer}, torch "
              f"threads {torch.get_num_threads()}, packing={args.packing}, load {os.getloadavg()[0]:.1f}", flush=True)
        for rep in range(args.reps):
            for side in (("ours", "trl") if rep % 2 == 0 else ("trl", "ours")):
                data_arg = data if side == "ours" else pairs
                runs[side].append(sides[side](model, data_arg, args, workdir / f"{side}{rep}"))
                print(f"round {rep + 1} {side}: {runs[side][-1]:.3f} samples/s (load {os.getloadavg()[0]:.1f})",
                      flush=True)
    ratios = [o / t for o, t in zip(runs["ours"], runs["trl"])]
    print(f"hpl train.py fit: median {statistics.median(runs['ours']):.3f} samples/s; TRL DPOTrainer: median "
          f"{statistics.median(runs['trl']):.3f} samples/s")
    print(f"ratio per round: {', '.join(f'{r:.3f}' for r in ratios)} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"ratio: {statistics.median(ratios):.4f}")


if __name__ == "__main__":
    main()
