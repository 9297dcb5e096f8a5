"""What a person sees: one actionable line per mistake, no noise about intended behaviour, bounded checkpoints, and
evaluation results that cannot be mistaken (no made-up rewards, a valid-action share, failure when nothing scored)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hpl_lightning.cli import main as train_main
from hpl_lightning.console import closest_keys, quiet
from hpl_lightning.evaluation import EPISODES_FILE, EpisodeRecord, EvaluationAborted, evaluate, summarize
from hpl_lightning.evaluation_cli import main as evaluate_main
from hpl_lightning.models import load_tokenizer
from hpl_lightning.policies import Policy
from tests.synthetic import make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _fit(tmp_path: Path, *extra: str) -> list[str]:
    return ["fit", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--data.max_length=512",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", *extra]


def _exit(capsys, fn, args: list[str]) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as info:
        fn(args)
    return info.value.code, capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------------------------------------ errors
def test_closest_keys_prefers_the_same_option_elsewhere_then_spelling() -> None:
    keys = ["model.lora", "model.optim.lr", "model.optim.weight_decay", "trainer.max_epochs", "trainer.max_steps"]
    assert closest_keys("model.lr", keys) == ["model.optim.lr"]
    assert closest_keys("trainer.max_epoch", keys)[0] == "trainer.max_epochs"
    assert closest_keys("zzz", keys) == []


def test_unknown_option_is_one_line_with_a_suggestion(capsys) -> None:
    code, lines = _exit(capsys, train_main, ["fit", "--model.lr", "1e-4"])
    assert code == 2
    assert lines[0] == "error: unrecognized arguments: --model.lr 1e-4"
    assert lines[1] == "did you mean: --model.optim.lr?"
    assert len(lines) == 3 and "--help" in lines[2]  # no usage dump


def test_experiment_mistakes_are_one_line(capsys, tmp_path) -> None:
    from hpl_lightning.experiment import main as experiment_main

    code, lines = _exit(capsys, experiment_main, ["--output_dir", str(tmp_path), "--seedz", "[0]"])
    assert code == 2 and lines[0] == "error: unrecognized arguments: --seedz [0]"
    assert lines[1].startswith("did you mean: --seeds") and len(lines) == 3  # no usage dump
    code, lines = _exit(capsys, experiment_main, ["--output_dir", str(tmp_path), "--arms", "[sft, hpl-jaccard]"])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: arms[1] ('hpl-jaccard'): unknown arm")


def test_missing_config_file_is_the_first_line(capsys, tmp_path) -> None:
    code, lines = _exit(capsys, train_main, ["fit", "-c", str(tmp_path / "nope.yaml")])
    assert code == 2 and lines[0].startswith("error: ") and "nope.yaml" in lines[0] and len(lines) == 2


def test_missing_policy_path_says_so() -> None:
    with pytest.raises(FileNotFoundError, match="'exportd/': no such file or directory"):
        load_tokenizer("exportd/")


def test_failed_runs_leave_no_run_directory_and_one_line(capsys, tmp_path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=1))
    code, lines = _exit(capsys, train_main, _fit(tmp_path, f"--data.train_path={train}",
                                                 f"--model.policy={tmp_path / 'exportd'}/"))
    assert code == 2 and lines == [f"error: model '{tmp_path / 'exportd'}/': no such file or directory "
                                   "(nor a Hugging Face hub name)"]
    assert not list((tmp_path / "runs").glob("*/version_*"))  # the logger had created one when setup began
    code, lines = _exit(capsys, train_main, _fit(tmp_path, f"--data.train_path={train}",
                                                 f"--ckpt_path={tmp_path / 'lats.ckpt'}"))
    assert code == 2 and lines[-1].startswith(f"error: --ckpt_path {tmp_path / 'lats.ckpt'}: no such file")
    assert not list((tmp_path / "runs").glob("*/version_*"))


# ------------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_are_bounded_plus_last_and_best(tmp_path) -> None:
    """Every step saves, yet only the 2 most recent periodic ones, last.ckpt and the best by val/loss remain."""
    records = make_records(n_tasks=2)
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", records[:6])
    train_main(_fit(tmp_path, f"--data.train_path={train}", f"--data.val_path={val}", "--trainer.max_steps=5",
                    "--data.batch_size=4", "--checkpoint.every_n_train_steps=1",
                    f"--checkpoint.dirpath={tmp_path / 'ckpt'}", f"--best_checkpoint.dirpath={tmp_path / 'ckpt'}",
                    "--trainer.max_epochs=3"))
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    last_step = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    assert last_step >= 4  # saved at least 4 times
    periodic = [n for n in names if n.startswith("step")]
    assert periodic == [f"step{last_step - 1:06d}.ckpt", f"step{last_step:06d}.ckpt"]
    assert len([n for n in names if n.startswith("best-")]) == 1, names


def test_resume_with_another_batch_size_is_refused_in_one_line(capsys, tmp_path) -> None:
    """The loader's saved position counts batches of the checkpoint's plan: another batch size would skip or repeat
    data, so the resume stops before training, unless data.allow_changed_resume says to go on."""
    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=1))
    run = [f"--data.train_path={train}", "--trainer.max_steps=1", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"]
    train_main(_fit(tmp_path, *run, "--data.batch_size=2"))
    resume = _fit(tmp_path, *run, "--trainer.max_steps=2", "--ckpt_path=last", "--data.batch_size=4")
    code, lines = _exit(capsys, train_main, resume)
    assert code == 2 and lines == [
        "error: resuming with data.batch_size 2 -> 4 since the checkpoint: the batch order differs, so its saved "
        "position would skip or repeat data; resume with the checkpoint's settings and data, or set "
        "data.allow_changed_resume=true"]
    train_main([*resume, "--data.allow_changed_resume=true"])
    assert "[hpl] warning: resuming with data.batch_size 2 -> 4" in capsys.readouterr().out


def test_resume_names_each_changed_setting_and_the_training_data(tmp_path) -> None:
    from types import SimpleNamespace

    from hpl_lightning.data import HPLDataModule
    from hpl_lightning.errors import UsageError

    records = make_records(n_tasks=1)
    train = write_jsonl(tmp_path / "train.jsonl", records)

    def datamodule(path: Path = train, accumulate: int = 1, world: int = 1, **kwargs) -> HPLDataModule:
        dm = HPLDataModule(train_path=str(path), max_length=512, **kwargs)
        dm.trainer = SimpleNamespace(accumulate_grad_batches=accumulate, world_size=world, global_rank=0,
                                     max_epochs=3, max_steps=-1)
        dm.setup("fit")
        return dm

    saved = datamodule().state_dict()
    edited = write_jsonl(tmp_path / "edited.jsonl", [{**records[0], "reward": 0.5}, *records[1:]])
    for dm, change in ((datamodule(accumulate=2), "trainer.accumulate_grad_batches 1 -> 2"),
                       (datamodule(world=2), "world size 1 -> 2"),
                       (datamodule(edited), "training data (content hash) "),
                       (datamodule(seed=1, batch_size=2), "data.seed 0 -> 1, data.batch_size 4 -> 2")):
        with pytest.raises(UsageError, match=f"^resuming with {re.escape(change)}"):
            dm.load_state_dict(saved)
    datamodule().load_state_dict(saved)  # the same run
    datamodule(batch_size=2).load_state_dict({k: saved[k] for k in ("seed", "curriculum", "schedule")})  # older


# ------------------------------------------------------------------------------------------------ quiet
def test_importing_the_trainer_prints_nothing() -> None:
    """bitsandbytes (imported by peft even without quantization) would log a kernels warning on CPU."""
    proc = subprocess.run([sys.executable, "-c", "import hpl_lightning.cli"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_intended_behaviour_warnings_are_filtered_others_kept() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet()
        warnings.warn("Found 33 module(s) in eval mode at the start of training. This may lead to ...")
        warnings.warn("Found keys that are in the model state dict but not in the checkpoint: ['reference.x']")
        warnings.warn("Found keys that are not in the model state dict but in the checkpoint: ['policy.x']")
    assert [str(w.message) for w in caught] == [
        "Found keys that are not in the model state dict but in the checkpoint: ['policy.x']"]


# ------------------------------------------------------------------------------------------------ evaluation
class _NoModel(Policy):
    def describe(self):
        return {"type": "none"}

    def generate(self, conversations):
        return ["Thought: -\nAction: submit" for _ in conversations]


def _closed_port_url() -> str:
    with socket.socket() as s:  # nothing listens on a port just released
        s.bind(("127.0.0.1", 0))
        return f"mysql://admin:admin@127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_environment_fails_with_the_reason_and_null_rewards(tmp_path) -> None:
    env = {"db_url": _closed_port_url(), "connect_timeout_s": 0}
    with pytest.raises(EvaluationAborted, match=r"no episode could be scored: all 2 failed.*cannot connect"):
        evaluate(_NoModel(), "intercode_sql", "test", tmp_path, workers=1, limit=2, env_kwargs=env, progress=False)
    records = [json.loads(line) for line in (tmp_path / EPISODES_FILE).read_text().splitlines()]
    assert len(records) == 2 and all(r["reward"] is None and r["error"] for r in records)


def test_unreachable_environment_exits_non_zero_from_the_command(capsys, tmp_path) -> None:
    code, lines = _exit(capsys, evaluate_main, [
        "run", "--benchmark=intercode_sql", "--limit=1", "--workers=1", "--max_new_tokens=2", "--threads=1",
        f"--db_url={_closed_port_url()}", '--env_kwargs={"connect_timeout_s": 0}', f"--output_dir={tmp_path}"])
    assert code == 1 and lines[-1].startswith("error: no episode could be scored") and "cannot connect" in lines[-1]


def test_reused_output_directory_is_one_line(capsys, tmp_path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"benchmark": "sciworld", "split": "dev", "policy": {}}))
    code, lines = _exit(capsys, evaluate_main, ["run", "--benchmark=intercode_sql", "--limit=0", "--db_url=x",
                                                f"--output_dir={tmp_path}"])
    assert code == 2 and len(lines) == 1 and "use another output_dir" in lines[0]


def test_summary_reports_the_valid_action_share_next_to_the_reward() -> None:
    """A starting score without a single valid action (ScienceWorld's find-* tasks) shows as 0 % valid."""

    def record(i: int, valid: list[bool], reward: float | None = 0.35, error: str | None = None) -> EpisodeRecord:
        return EpisodeRecord(id=str(i), group="find", reward=reward, success=False, turns=len(valid),
                             actions=[None] * len(valid), observations=[], messages=[], valid=valid, error=error)

    records = [record(0, [False] * 3), record(1, [True, False, False, True]), record(2, [], None, "crashed")]
    summary = summarize(records, "sciworld", "dev", {}, 3, {})
    assert summary["valid_action_rate"] == pytest.approx(2 / 7) and summary["avg_reward"] == pytest.approx(0.35)
    assert summary["groups"]["find"]["valid_action_rate"] == pytest.approx(2 / 7)
    assert summary["first_error"] == "2: crashed"


class _HalfValid(Policy):
    """Turn 1: a valid execute[...]; turn 2: no Action line; turn 3: an unparsable action; turn 4: submit."""

    def describe(self):
        return {"type": "half-valid"}

    def generate(self, conversations):
        script = ["Thought: look\nAction: execute[SELECT 1]", "I am not sure.", "Thought: hm\nAction: run it",
                  "Thought: done\nAction: submit"]
        return [script[(len(c) - 3) // 2] for c in conversations]


@pytest.mark.mysql
def test_intercode_reports_invalid_actions(mysql_url: str, tmp_path: Path) -> None:
    summary = evaluate(_HalfValid(), "intercode_sql", "test", tmp_path, workers=1, limit=1,
                       env_kwargs={"db_url": mysql_url}, progress=False)
    record = json.loads((tmp_path / EPISODES_FILE).read_text().splitlines()[0])
    assert record["valid"] == [True, False, False, True]
    assert summary["valid_action_rate"] == pytest.approx(0.5)
