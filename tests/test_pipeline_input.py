"""Bad input to the pipeline's subcommands and evaluate.py: one line naming file, line and field, exit status 2,
before any environment or model starts; and one writer per exploration output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpl_lightning.explore import output_lock, read_rollouts, repair_partial_line
from hpl_lightning.pipeline import main

REPO = Path(__file__).resolve().parents[1]
RECORDINGS = REPO.parent / "shared" / "data" / "intercode_sql" / "gpt-3.5_react_10_turns.json"
NO_SERVER = "mysql://nobody@127.0.0.1:9/none"  # nothing may connect before the input is checked


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("experts")
    main(["import", "--input", str(RECORDINGS), "--output", str(tmp / "experts.jsonl"), "--limit", "2"])
    main(["segment", "--input", str(tmp / "experts.jsonl"), "--output", str(tmp / "segmented.jsonl"),
          "--segmenter", "fixed_k"])
    return tmp / "segmented.jsonl"


def _edit_line(src: Path, dst: Path, line: int, edit) -> Path:
    lines = src.read_text().splitlines()
    lines[line - 1] = json.dumps(edit(json.loads(lines[line - 1])))
    dst.write_text("\n".join(lines) + "\n")
    return dst


def test_unknown_segmenter_is_an_argument_error(experts, tmp_path, capsys):
    err = _error(capsys, "segment", "--input", str(experts), "--output", str(tmp_path / "s.jsonl"),
                 "--segmenter", "fixed_kk")
    assert err.startswith("error: --segmenter/--options: unknown segmenter 'fixed_kk'; expected one of")
    err = _error(capsys, "stats", "--input", str(experts), "--segmenters", '["fixed_k", "nope"]')
    assert err.startswith("error: --segmenters/--options: unknown segmenter 'nope'")


def test_import_names_the_episode_line_and_missing_key(tmp_path, capsys):
    episodes = json.loads(RECORDINGS.read_text())
    first = dict(list(episodes.items())[:2])
    del first["1"]["turn_history"]
    broken = tmp_path / "recordings.json"
    broken.write_text(json.dumps(first, indent=2))
    line = broken.read_text().splitlines().index('  "1": {') + 1
    err = _error(capsys, "import", "--input", str(broken), "--output", str(tmp_path / "e.jsonl"))
    assert err == f"error: invalid data: {broken}:{line}: field 'turn_history': missing in episode '1'"
    broken.write_bytes(b'{"0": {"query": "caf\xe9"}}')
    err = _error(capsys, "import", "--input", str(broken), "--output", str(tmp_path / "e.jsonl"))
    assert err == f"error: invalid data: {broken}:1: not UTF-8: byte 0xe9"


def test_pairs_needs_an_existing_and_well_formed_rollouts_file(experts, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    err = _error(capsys, "pairs", "--experts", str(experts), "--rollouts", str(tmp_path / "rolouts.jsonl"),
                 "--output", str(out))
    assert err == f"error: invalid data: {tmp_path / 'rolouts.jsonl'}: field '--rollouts': file not found"
    assert not out.exists()
    rollout = {"key": "k", "task_id": "t", "level": "trajectory", "index": 0, "role": "agent", "sample": 0,
               "messages": [], "actions": [], "reward": 0.0, "done": True}
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text(json.dumps(rollout) + "\n" + json.dumps(rollout)[:40] + "}\n")
    err = _error(capsys, "pairs", "--experts", str(experts), "--rollouts", str(rollouts), "--output", str(out))
    assert err.startswith(f"error: invalid data: {rollouts}:2: malformed JSON")
    rollouts.write_text(json.dumps({k: v for k, v in rollout.items() if k != "reward"}) + "\n")
    err = _error(capsys, "pairs", "--experts", str(experts), "--rollouts", str(rollouts), "--output", str(out))
    assert err == f"error: invalid data: {rollouts}:1: field 'reward': missing"


@pytest.mark.parametrize("case", ["id out of range", "id of another benchmark", "groups with a gap", "no groups"])
def test_explore_checks_every_expert_before_any_environment(experts, tmp_path, capsys, case):
    edits = {
        "id out of range": (1, lambda r: {**r, "id": "intercode_sql/99999"}, "field 'id': 'intercode_sql/99999' is "
                            "not an InterCode-SQL task: expected 'intercode_sql/<index>' with index 0..1033"),
        "id of another benchmark": (2, lambda r: {**r, "id": "sciworld/boil/1"}, "field 'id': 'sciworld/boil/1'"),
        "groups with a gap": (2, lambda r: {**r, "meta": {**r["meta"], "groups": [[0, 0], [2, 2]]}},
                              "field 'meta.groups': gap at action 1"),
        "no groups": (2, lambda r: {**r, "meta": {}}, "field 'meta.groups': missing: run `pipeline segment` first"),
    }
    line, edit, message = edits[case]
    bad = _edit_line(experts, tmp_path / "experts.jsonl", line, edit)
    err = _error(capsys, "explore", "--experts", str(bad), "--output", str(tmp_path / "r.jsonl"),
                 "--db_url", NO_SERVER, "--policy", str(tmp_path / "no-model-here"))
    assert err.startswith(f"error: invalid data: {bad}:{line}: {message}"), err
    assert not (tmp_path / "r.jsonl").exists()


def test_a_second_explore_on_the_same_output_says_who_holds_it(experts, tmp_path):
    out = tmp_path / "rollouts.jsonl"
    with output_lock(out):
        done = subprocess.run(
            [sys.executable, "-m", "hpl_lightning.pipeline", "explore", "--experts", str(experts), "--output", str(out),
             "--db_url", NO_SERVER, "--progress", "false"],
            cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {out} is being written by pid {os.getpid()} on {os.uname().nodename} since "
        + done.stderr.split(" since ", 1)[1].split(" (lock:")[0] + f" (lock: {out}.lock); wait for it to finish "
        "or write to another --output"]
    assert not out.exists()


def test_partial_line_is_cut_in_place_and_readers_leave_it(tmp_path):
    out = tmp_path / "rollouts.jsonl"
    rollout = {"key": "k", "task_id": "t", "level": "trajectory", "index": 0, "role": "agent", "sample": 0,
               "messages": [], "actions": [], "reward": 0.0, "done": True}
    whole = (json.dumps(rollout) + "\n").encode()
    out.write_bytes(whole + b'{"key": "k2", "task')
    inode = out.stat().st_ino
    assert list(read_rollouts(out)) == ["k"] and out.read_bytes().endswith(b'"task')  # a reader changes nothing
    assert repair_partial_line(out) == len(b'{"key": "k2", "task')
    assert out.read_bytes() == whole and out.stat().st_ino == inode  # truncated, not rewritten


@pytest.mark.mysql
def test_replay_stopped_by_the_server_records_what_finished_and_resumes(mysql_url, tmp_path, monkeypatch):
    from hpl_lightning.envs import intercode_replay
    from hpl_lightning.envs.base import EnvironmentCrashed

    recordings, out = tmp_path / "rec.json", tmp_path / "outcomes.jsonl"
    recordings.write_text(json.dumps(dict(list(json.loads(RECORDINGS.read_text()).items())[:5])))
    real, calls = intercode_replay._replay_episode, []

    def server_gone_at_the_4th(env, record, tolerance):
        calls.append(record["task_id"])
        if len(calls) == 4:
            raise EnvironmentCrashed("SQL server failed while executing: (2013, 'Lost connection to server')")
        return real(env, record, tolerance)

    monkeypatch.setattr(intercode_replay, "_replay_episode", server_gone_at_the_4th)
    with pytest.raises(intercode_replay.ReplayStopped) as stopped:
        intercode_replay.replay(str(recordings), db_url=mysql_url, output=str(out))
    assert str(stopped.value) == (
        "replay stopped after 3 of 5 episodes: SQL server failed while executing: (2013, 'Lost connection to "
        f"server'). The finished ones are in {out}; run the same command again to resume")
    assert len(out.read_text().splitlines()) == 3
    calls.clear()
    result = intercode_replay.replay(str(recordings), db_url=mysql_url, output=str(out))
    assert calls == [3, 4]  # only what had not finished
    assert result["total"] + result["mutated"] == 5 and len(out.read_text().splitlines()) == 5


def test_replay_of_a_corrupt_recordings_file_names_the_line(tmp_path):
    recordings = tmp_path / "rec.json"
    recordings.write_text('{\n  "0": {"task_id": 0, "turn_history": {}},\n  "1": {"task_id": 1,, }\n}\n')
    done = subprocess.run([sys.executable, "evaluate.py", "replay", "--recordings", str(recordings), "--db_url",
                           NO_SERVER, "--output", str(tmp_path / "o.jsonl")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"error: invalid data: {recordings}:3: malformed JSON")
