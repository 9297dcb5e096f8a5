"""The committed studies (``results/*/results.json``) recompute exactly: the table's means and Student-t intervals
from the per-episode records, with numpy and scipy only (not the package's statistics code), and results.md shows
those numbers."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

STUDIES = sorted((Path(__file__).resolve().parents[1] / "results").glob("*/results.json"))


def test_the_sciworld_study_is_committed() -> None:
    assert any(p.parent.name == "sciworld-cpu-small" for p in STUDIES)


@pytest.mark.parametrize("path", STUDIES, ids=[p.parent.name for p in STUDIES])
def test_a_committed_study_recomputes_from_its_episodes(path: Path) -> None:
    saved = json.loads(path.read_text())
    confidence = saved["confidence"]
    # (arm, split) -> evaluation -> task -> record; a shared evaluation (the SFT model of a shared lineage) is listed
    # once per seed with the same records, and counts once
    cells: dict[tuple[str, str], dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in saved["episodes"]:
        cells[(r["arm"], r["split"])][r["evaluation"]][r["task"]] = r
    assert cells, "no episodes"
    md = (path.parent / "results.md").read_text()
    for (arm, split), evaluations in cells.items():
        cell = saved["table"][arm][split]
        assert cell["tasks"] == len({t for ev in evaluations.values() for t in ev})
        for metric in ("reward", "success", "valid_actions"):
            values = [r[metric] for ev in evaluations.values() for r in ev.values()]
            if metric == "valid_actions" and any(v is None for v in values):
                continue
            means = np.array([np.mean([float(r[metric]) for r in ev.values()]) for ev in evaluations.values()])
            got = cell[metric]
            assert got["n"] == len(means)
            assert got["mean"] == pytest.approx(means.mean(), abs=1e-12)
            if len(means) > 1:
                half = stats.t.ppf(0.5 + confidence / 2, len(means) - 1) * means.std(ddof=1) / math.sqrt(len(means))
                assert got["half_width"] == pytest.approx(half, abs=1e-12)
                if metric == "reward":
                    assert f"{100 * means.mean():.1f} ± {100 * half:.1f}" in md
            else:
                assert got["half_width"] is None
    # every paired comparison's observed difference is the mean over the (seed, task) cells both arms have
    by_cell = {(r["arm"], r["split"], r["seed"], r["task"]): r for r in saved["episodes"]}
    for c in saved["comparisons"]:
        diffs = [float(by_cell[(c["arm"], c["split"], s, t)]["reward"]) - float(r["reward"])
                 for (arm, split, s, t), r in by_cell.items()
                 if arm == c["baseline"] and split == c["split"] and (c["arm"], split, s, t) in by_cell]
        assert len(diffs) == c["reward"]["tasks"] * c["reward"]["seeds"]
        assert c["reward"]["diff"] == pytest.approx(np.mean(diffs), abs=1e-12)
        assert c["reward"]["low"] <= c["reward"]["diff"] <= c["reward"]["high"]
