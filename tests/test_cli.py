"""`train.py` parses every shipped config, and --help/--print_config work with no data present."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpl_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if "trainer" in yaml.safe_load(p.read_text()))
STRATEGIES = sorted((ROOT / "configs" / "strategies").glob("*.yaml"))


@pytest.mark.parametrize("config", TRAIN_CONFIGS + STRATEGIES, ids=lambda p: p.name)
def test_config_parses(config, capsys):
    args = ["fit", "-c", str(ROOT / "configs" / "hpl-qwen2.5-1.5b.yaml")] if config in STRATEGIES else ["fit"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["beta"] == pytest.approx((yaml.safe_load(config.read_text()).get("model") or {}).get("beta", 0.3))
    assert printed["trainer"]["use_distributed_sampler"] is False


def test_help_and_print_config_without_data(tmp_path):
    for flag in ("--help", "--print_config"):
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", flag], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "data.train_path" in proc.stdout or "train_path:" in proc.stdout
