"""Bad data stops `train.py` before training starts, naming file, line and field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpl_lightning.cli import main
from tests.synthetic import make_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _fit_args(tmp_path: Path, train: Path, *extra: str) -> list[str]:
    return [
        "fit", f"--data.train_path={train}", "--trainer.max_steps=2", "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}", "--data.max_length=512", *extra,
    ]


def _broken(tmp_path: Path, line: int, edit) -> Path:
    records = make_records(n_tasks=1)
    lines = [json.dumps(r) for r in records]
    lines[line - 1] = edit(records[line - 1])
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _without(key):
    return lambda r: json.dumps({k: v for k, v in r.items() if k != key})


CASES = {
    "malformed json": (3, lambda r: json.dumps(r)[:-5], r"train.jsonl:3: malformed JSON"),
    "missing field": (2, _without("rejected_reward"), r"train.jsonl:2: field 'rejected_reward': missing"),
    "unknown level": (3, lambda r: json.dumps({**r, "level": "turn"}), r"train.jsonl:3: field 'level': unknown"),
    "empty chosen": (4, lambda r: json.dumps({**r, "chosen": []}), r"train.jsonl:4: field 'chosen': empty"),
    "no agent turn": (2, lambda r: json.dumps({**r, "rejected": [{"role": "user", "content": "x"}]}),
                      r"train.jsonl:2: field 'rejected': no assistant turn"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_record_exits_before_training(tmp_path, capsys, case):
    line, edit, message = CASES[case]
    train = _broken(tmp_path, line, edit)
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tmp_path, train))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


def test_nothing_scorable_after_truncation_names_the_field(tmp_path, capsys):
    # the task statement alone is longer than max_length: truncation cannot keep any agent token
    records = make_records(n_tasks=1)
    task = {"role": "user", "content": "very long task statement " * 100}
    records[1]["prompt"] = records[1]["prompt"][:2] + [task]
    train = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(SystemExit):
        main(_fit_args(tmp_path, train, "--data.max_length=200"))
    assert "train.jsonl:2: field 'chosen': no agent token left to score within max_length 200" in capsys.readouterr().err


def test_bad_validation_file_fails_before_training_too(tmp_path):
    """As a user runs it: a subprocess, non-zero exit, one clear line, no checkpoint written."""
    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=1))
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({**make_records(n_tasks=1)[1], "id": 7, "chosen_reward": "high"}) + "\n")
    proc = subprocess.run(
        [sys.executable, "train.py", *_fit_args(tmp_path, train, f"--data.val_path={val}")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "val.jsonl:1: field 'chosen_reward': expected a finite number" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ckpt").exists()


def _raw_file(tmp_path: Path, line: int, raw: bytes) -> Path:
    lines = [json.dumps(r).encode() for r in make_records(n_tasks=1)]
    lines[line - 1] = raw
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _nested(depth: int) -> bytes:
    record = make_records(n_tasks=1)[0]
    return json.dumps({**record, "meta": {"x": "NEST"}}).replace('"NEST"', "[" * depth + "]" * depth).encode()


def _with_content(line: int, text: str) -> bytes:
    record = make_records(n_tasks=1)[line - 1]
    record["chosen" if "chosen" in record else "messages"][0]["content"] = text
    return json.dumps(record).encode()


ENCODING_CASES = {
    "latin-1 byte": (2, _with_content(2, "caf\u00e9").replace(b"\\u00e9", b"\xe9"),
                     "train.jsonl:2: not UTF-8: byte 0xe9 at column"),
    "lone surrogate": (3, _with_content(3, "x").replace(b'"x"', b'"\\ud800x"'),
                       "train.jsonl:3: field 'chosen[0].content': lone surrogate \\ud800 at character 0"),
    "nested 100000 deep": (2, _nested(100_000), "train.jsonl:2: nested deeper than 64 levels"),
    "nested 100 deep": (2, _nested(100), "train.jsonl:2: field 'meta.x"),
    "2 MB record": (4, _with_content(4, "y" * 2_000_000), "train.jsonl:4: record longer than 1,048,576 bytes"),
}


@pytest.mark.parametrize("case", sorted(ENCODING_CASES))
def test_undecodable_record_is_one_line_with_file_and_line(tmp_path, capsys, case):
    line, raw, message = ENCODING_CASES[case]
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tmp_path, _raw_file(tmp_path, line, raw)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err[-2000:]
    assert not (tmp_path / "ckpt").exists()


def test_utf16_file_is_named_as_such(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in make_records(n_tasks=1)) + "\n", encoding="utf-16")
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tmp_path, train))
    assert exit_info.value.code == 2
    assert "error: invalid data: " f"{train}:1: UTF-16 text (byte order mark)" in capsys.readouterr().err


def test_suspect_pairs_are_counted_and_printed_before_training(tmp_path, capsys):
    from hpl_lightning.data import HPLDataModule

    records = make_records(n_tasks=2)
    pairs = [i for i, r in enumerate(records) if "chosen" in r]
    same, inverted = records[pairs[0]], records[pairs[1]]
    same["rejected"] = same["chosen"]
    inverted["chosen_reward"], inverted["rejected_reward"] = 0.0, 1.0
    train = write_jsonl(tmp_path / "train.jsonl", records)
    val = write_jsonl(tmp_path / "val.jsonl", [records[pairs[2]], {**records[pairs[3]], "id": "val-only"}])
    HPLDataModule(train_path=str(train), val_path=str(val), max_length=512).setup("fit")
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[hpl] warning:")]
    assert warnings == [
        f"[hpl] warning: 1 pair(s) whose chosen equals rejected (first: {train}:{pairs[0] + 1})",
        f"[hpl] warning: 1 pair(s) with chosen_reward < rejected_reward (first: {train}:{pairs[1] + 1})",
        f"[hpl] warning: 1 id(s) in more than one file (first: {records[pairs[2]]['id']!r} at {train}:{pairs[2] + 1} "
        f"and {val}:1)",
    ]


def test_max_length_above_the_context_length_is_an_error(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", make_records(n_tasks=1))
    with pytest.raises(SystemExit) as exit_info:
        main(_fit_args(tmp_path, train, "--data.max_length=10000"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: data.max_length 10000 is above the context length 8192 of hpl-tiny: lower it to at most 8192")
