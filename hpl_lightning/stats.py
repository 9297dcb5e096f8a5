"""Statistics of experiment results: pure functions, no I/O.

- :func:`mean_ci`: mean over seeds with a Student-t confidence interval (the table's "mean ± half-width"); with one
  seed the interval is undefined (``half_width`` is NaN), never a made-up zero.
- :func:`paired_bootstrap`: difference between two arms evaluated on the same (seed, task) cells, resampling tasks
  and seeds independently with replacement (a two-level bootstrap: both the task sample and the seed sample are
  finite draws). Reports the observed difference, its percentile interval and a two-sided p-value
  ``min(1, 2 * min(P*(Δ <= 0), P*(Δ >= 0)))`` with add-one smoothing, so p is never exactly 0. Seeded: the same
  inputs and seed give the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

Cell = tuple[int, str]  # (seed, task id)


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float  # NaN when n < 2
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


@dataclass(frozen=True)
class Comparison:
    """``diff`` = mean(a) − mean(b) over the shared cells; [low, high] its bootstrap interval."""

    diff: float
    low: float
    high: float
    p_value: float
    n_tasks: int
    n_seeds: int
    resamples: int


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and Student-t half-width ``t_{1-α/2, n-1} · s / √n`` (s: sample standard deviation)."""
    if not values:
        raise ValueError("mean_ci of no values")
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n < 2:
        return Interval(float(x[0]), math.nan, 1)
    t = scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)
    return Interval(float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(n)), n)


def cell_matrix(values: Mapping[Cell, float], seeds: Sequence[int], tasks: Sequence[str]) -> np.ndarray:
    """values as a [seed, task] matrix (every cell must be present)."""
    missing = [(s, t) for s in seeds for t in tasks if (s, t) not in values]
    if missing:
        raise ValueError(f"{len(missing)} (seed, task) cells missing, e.g. {missing[:3]}")
    return np.array([[values[(s, t)] for t in tasks] for s in seeds], dtype=np.float64)


def paired_bootstrap(
    a: Mapping[Cell, float],
    b: Mapping[Cell, float],
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Comparison:
    """Paired bootstrap of mean(a) − mean(b) over the cells both arms have (tasks and seeds resampled)."""
    shared = set(a) & set(b)
    seeds = sorted({s for s, _ in shared})
    # the tasks every seed has (an episode that crashed in one run is left out of the comparison)
    tasks = sorted(t for t in {t for _, t in shared} if all((s, t) in shared for s in seeds))
    if not tasks:
        raise ValueError("paired_bootstrap: the two arms share no task evaluated under every seed")
    d = cell_matrix(a, seeds, tasks) - cell_matrix(b, seeds, tasks)
    rng = np.random.default_rng(seed)
    n_s, n_t = d.shape
    # Resample counts instead of indices: mean of d[seed_draw][:, task_draw] = c_s · d · c_t / (n_s n_t).
    c_s = rng.multinomial(n_s, np.full(n_s, 1 / n_s), size=resamples)
    c_t = rng.multinomial(n_t, np.full(n_t, 1 / n_t), size=resamples)
    boot = np.einsum("bs,st,bt->b", c_s, d, c_t) / (n_s * n_t)
    alpha = 1 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    below, above = (boot <= 0).sum(), (boot >= 0).sum()
    p = min(1.0, 2 * (min(below, above) + 1) / (resamples + 1))
    return Comparison(float(d.mean()), float(low), float(high), float(p), n_t, n_s, resamples)
