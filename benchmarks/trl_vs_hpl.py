"""Trajectory-level DPO throughput: ``train.py fit`` (HPLModule via LightningCLI, in-process) vs TRL's DPOTrainer.

Identical pairs (the bundled real InterCode-SQL trajectory pairs), model (a small Qwen2 built from the tiny config),
batch size, max length, optimizer steps, beta and learning rate; CPU, fp32. Throughput is steady-state samples/s
(steps 2..N; the first step pays for lazy initialisation in both). Last line: ``ratio: ours / TRL``.

    python benchmarks/trl_vs_hpl.py [--steps 12] [--batch-size 4] [--packing]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import QUICKSTART, StepTimer, read_records, small_qwen2  # noqa: E402


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
            f"--trainer.max_steps={args.steps}", "--trainer.accelerator=cpu",
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
        output_dir=str(workdir / "trl"), beta=0.3, learning_rate=1e-6, use_cpu=True, bf16=False, report_to=[],
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
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--packing", action="store_true", help="our side with model.packing=true")
    args = parser.parse_args()
    records = [r for r in read_records(QUICKSTART) if r.get("level") == "trajectory"]
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = small_qwen2(workdir / "model")
        data = workdir / "pairs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        print(f"{len(pairs)} trajectory pairs, batch {args.batch_size}, {args.steps} steps, max_length "
              f"{args.max_length}, torch threads {torch.get_num_threads()}, packing={args.packing}")
        ours = run_ours(model, data, args, workdir)
        print(f"hpl train.py fit: {ours:.3f} samples/s", flush=True)
        theirs = run_trl(model, pairs, args, workdir)
        print(f"TRL DPOTrainer: {theirs:.3f} samples/s")
    print(f"ratio: {ours / theirs:.4f}")


if __name__ == "__main__":
    main()
