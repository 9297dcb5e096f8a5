"""The experiment's statistics helpers on inputs whose answers are known by hand."""

from __future__ import annotations

import math

import pytest

from hpl_lightning.stats import mean_ci, paired_bootstrap


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


def _cells(values: dict[int, list[float]]) -> dict[tuple[int, str], float]:
    return {(s, f"t{i}"): v for s, vs in values.items() for i, v in enumerate(vs)}


def test_paired_bootstrap_constant_difference_has_a_point_interval_and_small_p() -> None:
    b = _cells({0: [0.1, 0.5, 0.9, 0.3], 1: [0.2, 0.4, 0.8, 0.0]})
    a = {k: v + 0.25 for k, v in b.items()}
    c = paired_bootstrap(a, b, resamples=2000, seed=0)
    assert c.diff == pytest.approx(0.25) and c.low == pytest.approx(0.25) and c.high == pytest.approx(0.25)
    assert c.p_value == pytest.approx(2 / 2001) and (c.n_tasks, c.n_seeds) == (4, 2)


def test_paired_bootstrap_is_seeded_and_symmetric_noise_is_not_significant() -> None:
    b = _cells({0: [0.0] * 6, 1: [0.0] * 6})
    a = _cells({0: [1.0, -1.0, 1.0, -1.0, 1.0, -1.0], 1: [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]})
    first, again = paired_bootstrap(a, b, seed=3), paired_bootstrap(a, b, seed=3)
    assert first == again  # reproducible
    assert first.diff == 0.0 and first.low < 0 < first.high and first.p_value > 0.5
    uneven = _cells({0: [0.13, -0.71, 0.42, 0.05, -0.2, 0.9], 1: [0.33, -0.1, 0.27, -0.64, 0.8, 0.02]})
    assert paired_bootstrap(uneven, b, 500, seed=4) != paired_bootstrap(uneven, b, 500, seed=5)  # seed drives it


def test_paired_bootstrap_uses_only_tasks_every_seed_has() -> None:
    b = _cells({0: [0.0, 0.0, 0.0], 1: [0.0, 0.0, 0.0]})
    a = {**_cells({0: [1.0, 1.0, 1.0], 1: [1.0, 1.0]})}  # seed 1 lacks t2
    c = paired_bootstrap(a, b, resamples=100)
    assert c.n_tasks == 2 and c.diff == 1.0
    with pytest.raises(ValueError, match="share no task"):
        paired_bootstrap({(0, "x"): 1.0}, {(0, "y"): 1.0})
