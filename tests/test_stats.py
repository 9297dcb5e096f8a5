"""The experiment's statistics helpers on inputs whose answers are known by hand, and the paired comparison's
coverage by simulation (seeded: the same figures every run; docs/statistics.md has the table)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from hpl_lightning.stats import (FLOOR, SCENARIOS, coverage, crossed_mean, discrete, holm, mean_ci,
                                 paired_difference, t_interval)


def test_t_interval_matches_the_textbook_value() -> None:
    # mean 2, s = 1, n = 3: t_{0.975, 2} = 4.302653 -> half-width 4.302653 / sqrt(3)
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    assert (ci.low, ci.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert mean_ci([0.5, 0.5]).half_width == 0.0
    assert mean_ci([1.0, 2.0, 3.0], confidence=0.9).half_width == pytest.approx(2.919986 / math.sqrt(3), abs=1e-5)


def test_one_seed_has_no_interval() -> None:
    ci = mean_ci([0.7])
    assert ci.mean == 0.7 and ci.n == 1 and math.isnan(ci.half_width)
    with pytest.raises(ValueError):
        mean_ci([])


def test_crossed_mean_with_seed_and_task_effects_and_no_residual() -> None:
    # d = seed + task exactly: seed means 2, 4 -> MS_seed = 3 * 2 / 1 = 6; task means 2, 3, 4 -> MS_task = 2 * 2 / 2
    # = 2; MS_res = 0. S T Var = 6 + 2 - 0 = 8; Satterthwaite df = 8^2 / (6^2 / 1 + 2^2 / 2) = 64 / 38
    est = crossed_mean(np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]))
    assert est.mean == pytest.approx(3.0) and est.se == pytest.approx(math.sqrt(8 / 6))
    assert est.df == pytest.approx(64 / 38)
    low, high, p = t_interval(est)
    half = scipy_stats.t.ppf(0.975, 64 / 38) * math.sqrt(8 / 6)
    assert (low, high) == pytest.approx((3 - half, 3 + half))
    assert p == pytest.approx(2 * scipy_stats.t.sf(3 / math.sqrt(8 / 6), 64 / 38))


def test_crossed_mean_subtracts_the_residual_and_counts_it_in_the_df() -> None:
    # seed means 2, 4 -> MS_seed = 3 * 2 / 1 = 6; task means 1.5, 4, 3.5 -> MS_task = 2 * 3.5 / 2 = 3.5; residuals
    # +-0.5, 0, -+0.5 -> MS_res = 1 / 2. S T Var = 6 + 3.5 - 0.5 = 9; df = 81 / (6^2 / 1 + 3.5^2 / 2 + 0.5^2 / 2)
    est = crossed_mean(np.array([[1.0, 3.0, 2.0], [2.0, 5.0, 5.0]]))
    assert est.mean == pytest.approx(3.0) and est.se == pytest.approx(math.sqrt(9 / 6))
    assert est.df == pytest.approx(81 / 42.25)


def test_crossed_mean_floors_the_variance_at_a_share_of_the_residual() -> None:
    # identical seeds: MS_seed = MS_res = 0; left: the one-way t over the task means 1, -1, 0 (sd 1, n 3): se =
    # 1 / sqrt(3), df 2
    est = crossed_mean(np.array([[1.0, -1.0, 0.0], [1.0, -1.0, 0.0]]))
    assert est.se == pytest.approx(1 / math.sqrt(3)) and est.df == pytest.approx(2)
    # no seed or task structure at all: MS_seed = MS_task = 0, MS_res = 4 -> 0 + 0 - 4 < 0, floored at FLOOR * 4
    # with the residual's 1 df
    est = crossed_mean(np.array([[1.0, -1.0], [-1.0, 1.0]]))
    assert est.se == pytest.approx(math.sqrt(FLOOR * 4 / 4)) and est.df == pytest.approx(1)
    low, high, p = t_interval(est)
    assert p == pytest.approx(1.0) and high == pytest.approx(scipy_stats.t.ppf(0.975, 1) * math.sqrt(FLOOR))
    # positive but below the floor: seed +-1, task +-0.5, residual +-1 -> MS_seed = 4, MS_task = 1, MS_res = 4 ->
    # 4 + 1 - 4 = 1 < FLOOR * 4 (FLOOR 0.3)
    est = crossed_mean(np.array([[2.5, -0.5], [-1.5, -0.5]]))
    assert est.se == pytest.approx(math.sqrt(FLOOR * 4 / 4)) and est.df == pytest.approx(1)


def test_one_seed_is_the_t_over_tasks_and_a_constant_difference_is_a_point() -> None:
    values = [0.25, -0.5, 0.75, 0.0, 0.5]
    low, high, _ = t_interval(crossed_mean(np.array([values])))
    ci = mean_ci(values)
    assert (low, high) == pytest.approx((ci.low, ci.high))
    low, high, p = t_interval(crossed_mean(np.full((3, 4), 0.25)))
    assert (low, high, p) == pytest.approx((0.25, 0.25, 0.0))
    low, high, p = t_interval(crossed_mean(np.zeros((3, 4))))
    assert (low, high, p) == (0.0, 0.0, 1.0)
    assert all(math.isnan(x) for x in t_interval(crossed_mean(np.array([[0.5]]))))  # one cell: no interval


def _cells(values: dict[int, list[float]]) -> dict[tuple[int, str], float]:
    return {(s, f"t{i}"): v for s, vs in values.items() for i, v in enumerate(vs)}


def test_paired_difference_pairs_cells_and_uses_only_tasks_every_seed_has() -> None:
    b = _cells({0: [0.0, 0.5, 0.25], 1: [0.0, 0.25, 0.25]})
    a = _cells({0: [0.5, 0.5, 1.0], 1: [0.25, 0.5]})  # seed 1 lacks t2
    c = paired_difference(a, b)
    d = np.array([[0.5, 0.0], [0.25, 0.25]])
    low, high, p = t_interval(crossed_mean(d))
    assert (c.n_tasks, c.n_seeds) == (2, 2) and c.diff == pytest.approx(0.25)
    assert (c.low, c.high, c.p_value) == pytest.approx((float(low), float(high), float(p)))
    with pytest.raises(ValueError, match="share no task"):
        paired_difference({(0, "x"): 1.0}, {(0, "y"): 1.0})


def test_p_value_and_interval_agree_even_with_tied_discrete_rewards() -> None:
    # the old bootstrap counted resampled differences of exactly 0 in both tails: p 1.00 beside [-16.7, +0.0]
    d = discrete(np.random.default_rng(1), 2000, 3, 4)
    assert (d == 0).mean() > 0.3  # many ties
    low, high, p = t_interval(crossed_mean(d))
    assert np.array_equal(p < 0.05, (low > 0) | (high < 0))


def test_holm_adjusts_in_the_inputs_order() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> non-decreasing 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []


@pytest.mark.parametrize("size", [(3, 4), (5, 20)], ids=["3x4", "5x20"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_interval_covers_a_zero_effect(scenario: str, size: tuple[int, int]) -> None:
    """2,000 zero-effect studies per cell (standard error of a coverage about 0.005): 93-97% in every scenario
    (docs/statistics.md: 0.948-0.959 averaged over 200,000 studies)."""
    got = coverage(SCENARIOS[scenario], *size, studies=2000, seed=0)
    assert 0.93 <= got <= 0.97, f"{scenario} at {size[0]} seeds x {size[1]} tasks: coverage {got:.3f}"
