"""The committed studies (``results/*/results.json``) recompute exactly: the table's means and Student-t intervals
and the paired comparisons' intervals and p-values from the per-episode records, with numpy and scipy only (not the
package's statistics code), and results.md shows those numbers."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

def crossed_t(d: np.ndarray, confidence: float) -> tuple[float, float, float, float | None]:
    """(low, high, p, df) of d's mean for random seeds (rows) and tasks (columns), by another route than
    hpl_lightning.stats: sums of squares from least-squares fits of the nested models 1, 1 + seed, 1 + task and
    1 + seed + task; S T Var(mean) = MS_seed + MS_task - MS_res with Satterthwaite df, or 0.3 MS_res with the
    residual's df where that is not above 0.3 MS_res; scipy's t (docs/statistics.md)."""
    n_s, n_t = d.shape
    y = d.ravel()  # seed-major
    ones, seed, task = np.ones((y.size, 1)), np.repeat(np.eye(n_s), n_t, axis=0), np.tile(np.eye(n_t), (n_s, 1))

    def rss(*blocks: np.ndarray) -> float:
        x = np.hstack(blocks)
        return float(np.sum((y - x @ np.linalg.lstsq(x, y, rcond=None)[0]) ** 2))

    terms = [(1.0, rss(ones) - rss(ones, seed), n_s - 1), (1.0, rss(ones) - rss(ones, task), n_t - 1),
             (-1.0, rss(ones, seed, task), (n_s - 1) * (n_t - 1))]
    terms = [(c, ss / df, df) for c, ss, df in terms if df > 0]  # (coefficient, mean square, df)
    if np.all(y == y[0]):  # every cell the same difference: no spread to estimate
        return y.mean(), y.mean(), float(y.mean() == 0), None
    ms_res = terms[-1][1] if n_s > 1 and n_t > 1 else 0.0
    if sum(c * m for c, m, _ in terms) <= 0.3 * ms_res * (1 + 1e-9):
        terms = [(0.3, ms_res, (n_s - 1) * (n_t - 1))]
    var = sum(c * m for c, m, _ in terms) / y.size
    df = (var * y.size) ** 2 / sum((c * m) ** 2 / f for c, m, f in terms)
    half = stats.t.ppf(0.5 + confidence / 2, df) * math.sqrt(var)
    return y.mean() - half, y.mean() + half, 2 * stats.t.sf(abs(y.mean()) / math.sqrt(var), df), df


# the experiment runner's studies (their stage records are published beside them), not other reports under results/
STUDIES = sorted(p for p in (Path(__file__).resolve().parents[1] / "results").glob("*/results.json")
                 if (p.parent / "stages").is_dir())


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
    # every paired comparison: the mean over the (seed, task) cells both arms have, its interval and p-value
    by_cell = {(r["arm"], r["split"], r["seed"], r["task"]): r for r in saved["episodes"]}
    for c in saved["comparisons"]:
        assert "df" in c["reward"], f"{path}: comparisons from the retired bootstrap; re-render the report"
        for metric in ("reward", "success"):
            diffs = {(s, t): float(by_cell[(c["arm"], c["split"], s, t)][metric]) - float(r[metric])
                     for (arm, split, s, t), r in by_cell.items()
                     if arm == c["baseline"] and split == c["split"] and (c["arm"], split, s, t) in by_cell}
            seeds, tasks = sorted({s for s, _ in diffs}), sorted({t for _, t in diffs})
            assert len(diffs) == len(seeds) * len(tasks) == c[metric]["tasks"] * c[metric]["seeds"]
            d = np.array([[diffs[(s, t)] for t in tasks] for s in seeds])
            got = c[metric]
            low, high, p, df = crossed_t(d, confidence)
            assert got["diff"] == pytest.approx(d.mean(), abs=1e-12)
            assert (got["low"], got["high"], got["p_value"]) == pytest.approx((low, high, p), abs=1e-9)
            assert got["df"] == (None if df is None else pytest.approx(df, rel=1e-6))
            if metric == "reward":
                assert f"| {100 * d.mean():+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] | {p:.3f} |" in md
