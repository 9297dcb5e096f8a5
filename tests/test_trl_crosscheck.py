"""train.py validate vs TRL's DPOTrainer.evaluate on the same policy, a *different* reference, and the same pairs."""

from __future__ import annotations

import json
import random

import pytest
import torch

from hpl_lightning.cli import HPLCLI
from hpl_lightning.data import HPLDataModule
from hpl_lightning.module import HPLModule
from tests.tiny import save_tiny_checkpoint

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _pairs(n: int) -> list[dict]:
    rng = random.Random(0)
    words = "select name from singer where age count order by country stadium concert".split()
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    return [
        {
            "prompt": [{"role": "user", "content": f"Question {i}: {say(8)}"}],
            "chosen": [{"role": "assistant", "content": f"Thought: {say(4)}\nAction: execute[{say(5)}]"}],
            "rejected": [{"role": "assistant", "content": f"Action: {say(3 + i % 4)}"}],
        }
        for i in range(n)
    ]


@pytest.mark.slow
def test_validate_matches_trl_dpo_trainer(tmp_path):
    policy = save_tiny_checkpoint(tmp_path / "policy", seed=1)
    reference = save_tiny_checkpoint(tmp_path / "reference", seed=2)
    pairs = _pairs(8)
    val = tmp_path / "val.jsonl"
    with val.open("w") as f:
        for i, p in enumerate(pairs):
            rec = {"id": f"p{i}", "task_id": f"t{i}", "level": "trajectory", "chosen_reward": 1.0,
                   "rejected_reward": 0.0, **p}
            f.write(json.dumps(rec) + "\n")

    cli = HPLCLI(
        HPLModule,
        HPLDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=[
            "validate",
            f"--model.policy={policy}",
            f"--model.reference={reference}",
            "--model.beta=0.3",
            f"--data.val_path={val}",
            "--data.batch_size=3",  # batches of 3, 3, 2: our means are per pair, whatever the batching
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ],
    )
    ours = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.3,
        use_cpu=True,
        report_to=[],
        per_device_eval_batch_size=len(pairs),  # one batch: TRL's eval loss is then the mean over all pairs
        max_length=None,
        # TRL's configs default to bf16=True, and accelerate then runs the reference model under bf16 autocast even
        # on CPU (per-token log-prob errors ~1e-3); compare in fp32 on both sides.
        bf16=False,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32),
        args=config,
        train_dataset=datasets.Dataset.from_list(pairs),
        eval_dataset=datasets.Dataset.from_list(pairs),
        processing_class=AutoTokenizer.from_pretrained(policy),
    )
    theirs = trainer.evaluate()

    assert ours["val/traj/loss"] == pytest.approx(theirs["eval_loss"], abs=1e-4)
    assert ours["val/traj/rewards_chosen"] == pytest.approx(theirs["eval_rewards/chosen"], abs=1e-4)
    assert ours["val/traj/rewards_rejected"] == pytest.approx(theirs["eval_rewards/rejected"], abs=1e-4)
    assert ours["val/traj/margin"] == pytest.approx(theirs["eval_rewards/margins"], abs=1e-4)
    # different checkpoints: the rewards are not trivially zero
    assert abs(ours["val/traj/rewards_chosen"]) > 1e-3
