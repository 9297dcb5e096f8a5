"""The authors' released pairs (github.com/PatrickG1014/HPL) trained here: `hpl-pipeline import --source hpl_release`
turns their trajectory, step and group pair files and curriculum phase files (tests/data/hpl_release, written in the
output schema of their pipeline/*/construct_preference_*.py, create_preference_traj.py and create_curriculum.py)
into validated preference records, and `train.py fit` trains them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpl_lightning.pipeline import main
from hpl_lightning.schema import load_records

REPO = Path(__file__).resolve().parents[1]
RELEASE = Path(__file__).parent / "data" / "hpl_release"
PHASES = [str(RELEASE / f"phase_{k}_data.json") for k in (1, 2, 3)]


def _import(output: Path, *inputs: str, extra: tuple[str, ...] = ()) -> dict:
    main(["import", "--source", "hpl_release", "--benchmark", "intercode_sql", "--input", json.dumps(list(inputs)),
          "--output", str(output), *extra])
    return {r.id: r for r, _ in load_records(output)}


def test_release_pairs_import_with_unknown_rewards_and_their_phases_then_train(tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    pairs = _import(out, str(RELEASE / "traj_preference.json"), str(RELEASE / "step_preference.json"), *PHASES)
    levels = sorted(p.level for p in pairs.values())
    assert levels == ["group"] * 3 + ["step"] * 2 + ["trajectory"] * 2  # each group pair once, whatever its phases
    assert all(p.chosen_reward is None and p.rejected_reward is None for p in pairs.values())  # never made up
    step = pairs["intercode_sql/12_1|step"]
    assert step.task_id == "intercode_sql/12" and step.meta["iteration"] == 1
    assert step.prompt[0]["role"] == "user" and step.prompt[1] == {"role": "assistant", "content": "OK"}
    group = {p.meta["release_id"]: p for p in pairs.values() if p.level == "group"}
    assert {k: p.meta["release_phase"] for k, p in group.items()} == {
        "12_group1_neg0": 1, "40_group0_neg0": 2, "40_group1_neg1": 3}
    cut = group["40_group1_neg1"]  # its chosen side ran past the group: cut after group_length actions
    assert cut.task_id == "intercode_sql/40_group1_neg1" and cut.difficulty == 0.2 and cut.group_length == 1
    assert [m["role"] for m in cut.chosen] == ["assistant"] and "Capacity > 10000" in cut.chosen[0]["content"]

    args = [sys.executable, "train.py", "fit", f"--data.train_path={out}", "--model.policy=hpl-tiny",
            "--trainer.max_steps=1", "--trainer.accelerator=cpu", "--data.max_length=512", "--data.batch_size=2",
            "--data.curriculum.length_thresholds=[3, 6]", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"]
    done = subprocess.run(args, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    # the release's buckets: phase 1 = B11, phase 2 adds B12 (and B21), phase 3 the rest
    assert "epoch 0 (phase 1): 5 items {'group': 1, 'step': 2, 'trajectory': 2}" in done.stdout


def test_whole_chosen_side_is_kept_on_request(tmp_path: Path) -> None:
    pairs = _import(tmp_path / "pairs.jsonl", str(RELEASE / "group_preference.json"),
                    extra=("--group_chosen", "whole"))
    (whole,) = [p for p in pairs.values() if p.meta["release_id"] == "40_group1_neg1"]
    assert whole.meta["chosen_whole"] is True and whole.group_length == 1
    assert [m["role"] for m in whole.chosen] == ["assistant", "user", "assistant"]  # as the release wrote it


def _bad(tmp_path: Path, items: list, capsys: pytest.CaptureFixture[str], name: str = "bad.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(items, indent=4))
    with pytest.raises(SystemExit) as info:
        main(["import", "--source", "hpl_release", "--benchmark", "intercode_sql", "--input", str(path),
              "--output", str(tmp_path / "out.jsonl")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(lines) == 1
    return lines[0]


def test_bad_release_files_are_one_line_naming_file_line_and_field(tmp_path: Path, capsys) -> None:
    traj = json.loads((RELEASE / "traj_preference.json").read_text())
    speaker = json.loads(json.dumps(traj))
    speaker[1]["rejected"][0]["from"] = "system"
    line = json.dumps(speaker, indent=4).splitlines().index("    {", 2) + 1  # where the 2nd pair starts
    assert _bad(tmp_path, speaker, capsys).startswith(
        f"error: invalid data: {tmp_path / 'bad.json'}:{line}: field 'rejected[0]': expected {{'from': 'human'|'gpt'")
    group = json.loads((RELEASE / "group_preference.json").read_text())
    too_long = [{**group[1], "group_length": 2}]  # one action in chosen
    assert _bad(tmp_path, too_long, capsys) == (f"error: invalid data: {tmp_path / 'bad.json'}:2: field "
                                                "'group_length': is 2 but 'chosen' has 1 assistant turns")
    gap = [{**group[0], "difficulty": 0.5}]  # L1D2: phase 2 by create_curriculum.py, not 1
    assert _bad(tmp_path, gap, capsys, "phase_1_data.json") == (
        f"error: invalid data: {tmp_path / 'phase_1_data.json'}:2: field 'difficulty': first in phase 1, but "
        "create_curriculum.py's buckets put B12 in phase 2")
    with pytest.raises(SystemExit):
        main(["import", "--source", "hpl_release", "--input", PHASES[0], "--output", str(tmp_path / "o.jsonl")])
    assert capsys.readouterr().err.strip() == ("error: source hpl_release needs --benchmark (the release's files do "
                                               "not name it)")


def test_phases_must_be_cumulative(tmp_path: Path) -> None:
    from hpl_lightning.errors import DataError
    from hpl_lightning.importers import hpl_release

    group = json.loads((RELEASE / "group_preference.json").read_text())
    (tmp_path / "phase_2_data.json").write_text(json.dumps(group[1:2], indent=4))  # B12 only: B11 left out
    with pytest.raises(DataError, match=r"phase_1_data.json:2: listed in phase file\(s\) \[1\] of \[1, 2\]"):
        hpl_release([PHASES[0], str(tmp_path / "phase_2_data.json")], str(tmp_path / "out.jsonl"), "intercode_sql")
