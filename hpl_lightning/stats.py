"""Statistics of experiment results: pure functions, no I/O. What they estimate and why: ``docs/statistics.md``.

- :func:`mean_ci`: mean over seeds with a Student-t confidence interval (the table's "mean ± half-width"); with one
  seed the interval is undefined (``half_width`` is NaN), never a made-up zero.
- :func:`crossed_mean`: the mean of a [seed, task] matrix of paired differences and its standard error when seeds
  and tasks are both random draws (crossed random effects: seed x arm, task x arm, residual), with Satterthwaite
  degrees of freedom; vectorised over leading axes (the coverage simulation runs thousands of studies at once).
- :func:`t_interval`: the interval and two-sided p-value of such an estimate, both from the same t distribution,
  so p < 1 − confidence exactly when the interval excludes 0.
- :func:`paired_difference`: two arms evaluated on the same (seed, task) cells, compared that way.
- :func:`holm`: Holm's step-down adjustment of p-values over a family of hypotheses.
- :func:`coverage`: how often the interval covers a known zero effect in simulated studies (``python -m
  hpl_lightning.stats`` prints the table of ``docs/statistics.md``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

Cell = tuple[int, str]  # (seed, task id)
# The floor of the variance estimate, as a share of the residual mean square: calibrated by simulation so that the
# interval holds 95% where a variance component is 0 (at or near the floor the variance is underestimated while
# Satterthwaite's df stay small; docs/statistics.md has the calibration and the coverage it gives).
FLOOR = 0.3
METHOD = (f"crossed random effects of seed and task (unbiased ANOVA estimate of the mean's variance, floored at "
          f"{FLOOR:g} x the residual mean square), Satterthwaite t")


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
    """``diff`` = mean(a) − mean(b) over the shared cells; [low, high] its t interval (``se``, ``df``)."""

    diff: float
    low: float
    high: float
    p_value: float
    se: float
    df: float
    n_tasks: int
    n_seeds: int


@dataclass(frozen=True)
class CrossedMean:
    """Arrays over the leading axes of the input: the grand mean, its standard error and the t degrees of freedom
    (NaN where the standard error is 0 or cannot be estimated)."""

    mean: np.ndarray
    se: np.ndarray
    df: np.ndarray


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


def crossed_mean(d: np.ndarray) -> CrossedMean:
    """Mean of ``d[..., seed, task]`` and its standard error under d = δ + seed_s + task_t + residual_st.

    Var(mean) = σ²_seed/S + σ²_task/T + σ²_res/(ST). The two-way ANOVA mean squares have E MS_seed = σ²_res +
    T σ²_seed, E MS_task = σ²_res + S σ²_task, E MS_res = σ²_res, so U = MS_seed + MS_task − MS_res estimates
    S·T·Var(mean) without bias; it is used as it is (not truncated per component: that only ever widens the
    interval, 0.98 coverage where a variance is 0), with Satterthwaite's degrees of freedom for a combination with
    a negative coefficient, which become small (a wide t) as U nears 0. Below FLOOR · MS_res, U is replaced by
    FLOOR · MS_res with the residual's degrees of freedom (U can be negative). One seed (or one task): the other
    factor's one-way t, which then generalises over that factor only."""
    d = np.asarray(d, dtype=np.float64)
    n_s, n_t = d.shape[-2:]
    mean = d.mean(axis=(-2, -1))
    seed = d.mean(axis=-1) - mean[..., None]
    task = d.mean(axis=-2) - mean[..., None]
    ss_s = n_t * (seed**2).sum(axis=-1)
    ss_t = n_s * (task**2).sum(axis=-1)
    ss_e = ((d - seed[..., :, None] - task[..., None, :] - mean[..., None, None]) ** 2).sum(axis=(-2, -1))
    df_s, df_t, df_e = n_s - 1, n_t - 1, (n_s - 1) * (n_t - 1)
    ms_s, ms_t, ms_e = ss_s / max(df_s, 1), ss_t / max(df_t, 1), ss_e / max(df_e, 1)  # 0 where a df is 0
    unbiased = ms_s + ms_t - ms_e
    floor = FLOOR * ms_e
    # at or below the floor up to rounding (so that an exact tie, possible with discrete rewards, takes the floor
    # whatever the order of the floating-point sums)
    floored = unbiased <= floor * (1 + 1e-9)
    var_st = np.where(floored, floor, unbiased)
    var_st = np.where(np.ptp(d, axis=(-2, -1)) == 0, 0.0, var_st)  # every cell the same: 0, not rounding
    spread = np.where(floored, floor**2 / max(df_e, 1),
                      sum(ms**2 / df for ms, df in ((ms_s, df_s), (ms_t, df_t), (ms_e, df_e)) if df > 0))
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 only where var_st is 0
        df = np.where(var_st > 0, var_st**2 / spread, np.nan)
    se = np.sqrt(var_st / (n_s * n_t)) if n_s * n_t > 1 else np.full_like(mean, np.nan)
    return CrossedMean(mean, se, df)


def t_interval(estimate: CrossedMean, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, two-sided p of "mean = 0") from mean ± t_{df} · se. A standard error of exactly 0 (every cell
    the same difference) gives the point itself and p = 0 (or 1 where the mean is 0)."""
    m, se, df = estimate.mean, estimate.se, estimate.df
    with np.errstate(divide="ignore", invalid="ignore"):
        q = scipy_stats.t.ppf(0.5 + confidence / 2, df)
        half = np.where(se == 0, 0.0, q * se)
        p = np.where(se == 0, np.where(m == 0, 1.0, 0.0), 2 * scipy_stats.t.sf(np.abs(m) / se, df))
    p = np.where(np.isnan(se), np.nan, p)
    return m - half, m + half, p


def paired_difference(a: Mapping[Cell, float], b: Mapping[Cell, float], confidence: float = 0.95) -> Comparison:
    """mean(a) − mean(b) over the cells both arms have, with :func:`crossed_mean`'s interval and p-value."""
    shared = set(a) & set(b)
    seeds = sorted({s for s, _ in shared})
    # the tasks every seed has (an episode that crashed in one run is left out of the comparison)
    tasks = sorted(t for t in {t for _, t in shared} if all((s, t) in shared for s in seeds))
    if not tasks:
        raise ValueError("paired_difference: the two arms share no task evaluated under every seed")
    estimate = crossed_mean(cell_matrix(a, seeds, tasks) - cell_matrix(b, seeds, tasks))
    low, high, p = t_interval(estimate, confidence)
    return Comparison(float(estimate.mean), float(low), float(high), float(p), float(estimate.se),
                      float(estimate.df), len(tasks), len(seeds))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input's order: rejecting every hypothesis whose adjusted p is <= α keeps the
    family-wise error rate at α (the i-th smallest p is multiplied by m − i + 1, then made non-decreasing)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order]))
    out = np.empty_like(p)
    out[order] = adjusted
    return out.tolist()


# -- coverage by simulation: studies with a known zero effect, the share whose interval covers 0 -----------------
REWARD_LEVELS = np.array([0.0, 0.25, 0.5, 1.0])  # ScienceWorld's lifespan tasks' episode rewards


def discrete(rng: np.random.Generator, studies: int, n_s: int, n_t: int) -> np.ndarray:
    """Both arms draw each cell's reward from the task's own distribution over REWARD_LEVELS (Dirichlet(1, 1, 1, 1)
    per task, shared by the arms: no effect); many differences are exactly 0."""
    thresholds = rng.dirichlet(np.ones(len(REWARD_LEVELS)), (studies, 1, n_t)).cumsum(axis=-1)[..., :-1]

    def arm() -> np.ndarray:
        return REWARD_LEVELS[(rng.random((studies, n_s, n_t, 1)) > thresholds).sum(axis=-1)]

    return arm() - arm()


def gaussian(seed_sd: float, task_sd: float, noise_sd: float = 1.0) -> Callable[..., np.ndarray]:
    """Differences seed_s + task_t + noise_st with the given standard deviations (seed: the seed x arm effect,
    task: the task x arm interaction)."""

    def draw(rng: np.random.Generator, studies: int, n_s: int, n_t: int) -> np.ndarray:
        return (rng.normal(0, seed_sd, (studies, n_s, 1)) + rng.normal(0, task_sd, (studies, 1, n_t))
                + rng.normal(0, noise_sd, (studies, n_s, n_t)))

    return draw


SCENARIOS: dict[str, Callable[..., np.ndarray]] = {
    "seed effects": gaussian(1.0, 0.0),
    "task x arm effects": gaussian(0.0, 1.0),
    "cell noise only": gaussian(0.0, 0.0),
    "discrete rewards": discrete,
}


def coverage(draw: Callable[..., np.ndarray], n_seeds: int, n_tasks: int, studies: int = 2000, seed: int = 0,
             confidence: float = 0.95) -> float:
    """Share of ``studies`` simulated zero-effect studies (``draw(rng, studies, n_seeds, n_tasks)`` -> differences)
    whose :func:`t_interval` covers 0."""
    d = draw(np.random.default_rng(seed), studies, n_seeds, n_tasks)
    low, high, _ = t_interval(crossed_mean(d), confidence)
    return float(np.mean((low <= 0) & (0 <= high)))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Coverage of the paired-comparison interval on zero-effect studies")
    parser.add_argument("--sizes", nargs="+", default=["3x4", "5x20"], help="seeds x tasks")
    parser.add_argument("--studies", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", action="store_true",
                        help="also the seed and task x arm standard deviations from 0 to 4 (cell noise sd 1)")
    args = parser.parse_args(argv)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes]
    scenarios = dict(SCENARIOS)
    if args.sweep:
        for sd in (0.25, 0.5, 1.0, 2.0, 4.0):
            scenarios |= {f"seed sd {sd}": gaussian(sd, 0.0), f"task x arm sd {sd}": gaussian(0.0, sd),
                          f"both sd {sd}": gaussian(sd, sd)}
    print(f"coverage of the 95% interval, {args.studies} zero-effect studies each (simulation seed {args.seed})\n")
    print("| scenario | " + " | ".join(f"{s} x {t}" for s, t in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, draw in scenarios.items():
        cells = [f"{coverage(draw, s, t, args.studies, args.seed):.3f}" for s, t in sizes]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
