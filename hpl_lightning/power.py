"""Design of a study from its pilot: variance components of a paired difference, and the power and minimum
detectable effect (MDE) of the interval :func:`hpl_lightning.stats.crossed_mean` gives, by simulation.

A paired difference over S seeds x T tasks is modelled as in ``docs/statistics.md``: d_st = δ + u_s + v_t + e_st.
:func:`components` estimates σ²_seed, σ²_task, σ²_res from a pilot's [seed, task] matrix by the ANOVA method of
moments (a negative estimate is set to 0: a variance is planned, not tested). A planned design's power is the share
of simulated studies (Gaussian components, the study's S and T) whose interval excludes 0 in the predicted
direction. The interval's standard error and degrees of freedom do not depend on δ (the ANOVA removes the mean),
so one set of zero-effect draws gives the whole power curve: the interval of effect δ is the zero-effect interval
shifted by δ, and the MDE at power π is minus the (1 − π) quantile of the zero-effect lower bounds.

    python -m hpl_lightning.power results/study2/pilot/results.json --split dev \\
        --compare hpl-semantic_embedding:sft eto:sft --sizes 3x50 5x50 8x50 --alpha 0.05 0.0125
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from hpl_lightning.stats import cell_matrix, crossed_mean, t_interval


@dataclass(frozen=True)
class Components:
    """Variance components (reward units squared) of a paired difference and the pilot's mean squares."""

    seed: float  # σ²_seed: the seed x arm effect
    task: float  # σ²_task: the task x arm interaction
    residual: float  # σ²_res: seed x task x arm and episode noise
    ms_seed: float
    n_seeds: int
    n_tasks: int

    def var_mean(self, n_seeds: int, n_tasks: int) -> float:
        """Var(d̄) of a design with ``n_seeds`` x ``n_tasks`` cells."""
        return self.seed / n_seeds + self.task / n_tasks + self.residual / (n_seeds * n_tasks)

    def seed_upper(self, confidence: float = 0.8) -> Components:
        """The same with σ²_seed at its one-sided upper confidence bound: MS_seed's χ² bound with S − 1 degrees of
        freedom (σ²_seed = (MS_seed − MS_res) / T). With few pilot seeds the point estimate is a weak guide."""
        df = self.n_seeds - 1
        ms_upper = df * self.ms_seed / scipy_stats.chi2.ppf(1 - confidence, df)
        return replace(self, seed=max(0.0, (ms_upper - self.residual) / self.n_tasks))


def components(d: np.ndarray) -> Components:
    """σ²_seed, σ²_task, σ²_res of a [seed, task] difference matrix (at least 2 x 2) from the two-way ANOVA:
    E MS_seed = σ²_res + T σ²_seed, E MS_task = σ²_res + S σ²_task, E MS_res = σ²_res."""
    d = np.asarray(d, dtype=np.float64)
    n_s, n_t = d.shape
    if n_s < 2 or n_t < 2:
        raise ValueError(f"variance components need at least 2 seeds and 2 tasks, got {n_s} x {n_t}")
    seed = d.mean(axis=1) - d.mean()
    task = d.mean(axis=0) - d.mean()
    ms_s = n_t * (seed**2).sum() / (n_s - 1)
    ms_t = n_s * (task**2).sum() / (n_t - 1)
    ms_e = ((d - seed[:, None] - task[None, :] - d.mean()) ** 2).sum() / ((n_s - 1) * (n_t - 1))
    return Components(seed=max(0.0, (ms_s - ms_e) / n_t), task=max(0.0, (ms_t - ms_e) / n_s), residual=ms_e,
                      ms_seed=ms_s, n_seeds=n_s, n_tasks=n_t)


def zero_effect_lows(c: Components, n_seeds: int, n_tasks: int, alpha: float = 0.05, studies: int = 20000,
                     seed: int = 0) -> np.ndarray:
    """Lower bounds of the two-sided (1 − α) interval in ``studies`` simulated zero-effect studies."""
    rng = np.random.default_rng(seed)
    d = (rng.normal(0, np.sqrt(c.seed), (studies, n_seeds, 1)) + rng.normal(0, np.sqrt(c.task), (studies, 1, n_tasks))
         + rng.normal(0, np.sqrt(c.residual), (studies, n_seeds, n_tasks)))
    low, _, _ = t_interval(crossed_mean(d), 1 - alpha)
    return np.nan_to_num(low, nan=0.0)  # no interval (a constant matrix): never a detection


def power(c: Components, n_seeds: int, n_tasks: int, effect: float, alpha: float = 0.05, studies: int = 20000,
          seed: int = 0) -> float:
    """Share of simulated studies with true difference ``effect`` > 0 whose interval lies above 0."""
    return float(np.mean(zero_effect_lows(c, n_seeds, n_tasks, alpha, studies, seed) + effect > 0))


def minimum_detectable_effect(c: Components, n_seeds: int, n_tasks: int, alpha: float = 0.05, target: float = 0.8,
                              studies: int = 20000, seed: int = 0) -> float:
    """The smallest effect detected (interval above 0) in a share ``target`` of simulated studies."""
    return float(-np.quantile(zero_effect_lows(c, n_seeds, n_tasks, alpha, studies, seed), 1 - target))


def paired_matrix(arm: Mapping[tuple[int, str], float], baseline: Mapping[tuple[int, str], float]) -> np.ndarray:
    """[seed, task] differences ``arm`` − ``baseline`` over the seeds both have and the tasks every such seed has
    for both (an empty matrix when they share no cell)."""
    shared = set(arm) & set(baseline)
    seeds = sorted({s for s, _ in shared})
    tasks = sorted(t for t in {t for _, t in shared} if all((s, t) in shared for s in seeds))
    if not seeds or not tasks:
        return np.empty((len(seeds), 0))
    return cell_matrix(arm, seeds, tasks) - cell_matrix(baseline, seeds, tasks)


def achieved_mde(d: np.ndarray, alpha: float = 0.05, target: float = 0.8) -> float | None:
    """The MDE of the design as run (its S x T) under the variance components its own differences ``d`` show; None
    with fewer than 2 seeds or 2 tasks (no components)."""
    if d.ndim != 2 or min(d.shape) < 2:
        return None
    return minimum_detectable_effect(components(d), *d.shape, alpha=alpha, target=target)


def difference_matrix(episodes: Sequence[dict[str, Any]], arm: str, baseline: str, split: str) -> np.ndarray:
    """[seed, task] rewards of ``arm`` minus ``baseline`` on ``split`` from results.json's ``episodes`` (the
    cells both have; a shared baseline evaluation is listed under every seed)."""
    cells: dict[str, dict[tuple[int, str], float]] = defaultdict(dict)
    for e in episodes:
        if e["split"] == split and e["arm"] in (arm, baseline):
            cells[e["arm"]][(e["seed"], e["task"])] = e["reward"]
    d = paired_matrix(cells[arm], cells[baseline])
    if d.size == 0:
        raise ValueError(f"no (seed, task) cell has both {arm} and {baseline} on {split}")
    return d


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Variance components from a pilot's results.json and the minimum "
                                                 "detectable effect of planned designs (80% power by default)")
    parser.add_argument("results", type=Path, help="a results.json written by the experiment runner")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--compare", nargs="+", required=True, help="ARM:BASELINE pairs")
    parser.add_argument("--sizes", nargs="+", default=["3x50", "5x50"], help="planned seeds x tasks")
    parser.add_argument("--alpha", nargs="+", type=float, default=[0.05], help="two-sided levels (Holm's first "
                        "step over m hypotheses: 0.05 / m)")
    parser.add_argument("--power", type=float, default=0.8)
    parser.add_argument("--studies", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    episodes = json.loads(args.results.read_text(encoding="utf-8"))["episodes"]
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes]
    print(f"{args.results} ({args.split}); reward points; MDE at {args.power:.0%} power, {args.studies} simulated "
          f"studies (seed {args.seed})\n")
    print("| comparison | pilot S x T | mean | sd seed | sd task | sd residual | components | alpha | "
          + " | ".join(f"MDE {s} x {t}" for s, t in sizes) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(sizes))
    for pair in args.compare:
        arm, baseline = pair.split(":")
        d = difference_matrix(episodes, arm, baseline, args.split)
        point = components(d)
        for label, c in (("pilot", point), ("seed at 80% upper bound", point.seed_upper(0.8))):
            for alpha in args.alpha:
                mdes = [100 * minimum_detectable_effect(c, s, t, alpha, args.power, args.studies, args.seed)
                        for s, t in sizes]
                print(f"| {arm} − {baseline} | {d.shape[0]} x {d.shape[1]} | {100 * d.mean():+.1f} | "
                      f"{100 * np.sqrt(c.seed):.1f} | {100 * np.sqrt(c.task):.1f} | {100 * np.sqrt(c.residual):.1f} | "
                      f"{label} | {alpha:g} | " + " | ".join(f"{m:.1f}" for m in mdes) + " |")


if __name__ == "__main__":
    main()
