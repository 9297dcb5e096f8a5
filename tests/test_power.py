"""The study-design arithmetic: variance components recovered, power and MDE consistent with each other and with
the normal approximation where the t's degrees of freedom are large."""

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from hpl_lightning.power import Components, components, difference_matrix, main, minimum_detectable_effect, power


def test_components_recover_known_variances() -> None:
    rng = np.random.default_rng(0)
    d = rng.normal(0, 0.3, (300, 1)) + rng.normal(0, 0.2, (1, 300)) + rng.normal(0, 0.1, (300, 300))
    c = components(d)
    assert c.seed == pytest.approx(0.09, rel=0.2)
    assert c.task == pytest.approx(0.04, rel=0.2)
    assert c.residual == pytest.approx(0.01, rel=0.05)


def test_components_hand_computed_and_negatives_set_to_zero() -> None:
    # rows differ by 1 in every column, columns do not differ beyond noise: MS_seed = 3 * 0.5 = 1.5 per row pair
    d = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    c = components(d)
    assert (c.seed, c.task, c.residual) == (pytest.approx(0.5), 0.0, 0.0)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        components(np.ones((1, 5)))


def test_mde_is_where_power_reaches_the_target() -> None:
    c = Components(seed=0.01, task=0.02, residual=0.05, ms_seed=0.0, n_seeds=2, n_tasks=50)
    mde = minimum_detectable_effect(c, 5, 50, studies=4000)
    assert power(c, 5, 50, mde * 1.02, studies=4000) >= 0.8 > power(c, 5, 50, mde * 0.98, studies=4000)


def test_mde_matches_the_normal_approximation_with_many_degrees_of_freedom() -> None:
    c = Components(seed=0.0, task=0.01, residual=0.04, ms_seed=0.0, n_seeds=2, n_tasks=50)
    z = scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)
    expected = z * np.sqrt(c.var_mean(20, 200))
    assert minimum_detectable_effect(c, 20, 200, studies=4000) == pytest.approx(expected, rel=0.05)


def test_seed_variance_dominating_needs_seeds_not_tasks() -> None:
    c = Components(seed=0.02, task=0.0, residual=0.02, ms_seed=0.0, n_seeds=2, n_tasks=50)
    assert minimum_detectable_effect(c, 3, 400, studies=4000) > minimum_detectable_effect(c, 8, 50, studies=4000)
    # a stricter level (Holm's first step over 4 hypotheses) needs a larger effect
    assert minimum_detectable_effect(c, 5, 50, alpha=0.0125, studies=4000) > minimum_detectable_effect(
        c, 5, 50, studies=4000)


def test_seed_upper_bound_exceeds_the_point_estimate() -> None:
    c = components(np.array([[0.1, 0.3, 0.2], [0.4, 0.5, 0.6]]))
    assert c.seed_upper(0.8).seed > c.seed > 0


def test_difference_matrix_pairs_cells_and_repeats_a_shared_baseline(tmp_path, capsys) -> None:
    episodes = [{"arm": "sft", "seed": s, "split": "dev", "task": t, "reward": r}
                for s in (0, 1) for t, r in (("a", 0.5), ("b", 0.0), ("c", 1.0))]
    episodes += [{"arm": "hpl", "seed": s, "split": "dev", "task": t, "reward": r + 0.1 * s}
                 for s in (0, 1) for t, r in (("a", 0.75), ("b", 0.0), ("c", 1.0))]
    episodes += [{"arm": "hpl", "seed": 0, "split": "test", "task": "a", "reward": 1.0}]
    d = difference_matrix(episodes, "hpl", "sft", "dev")
    np.testing.assert_allclose(d, [[0.25, 0.0, 0.0], [0.35, 0.1, 0.1]])
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"episodes": episodes}))
    main([str(path), "--compare", "hpl:sft", "--sizes", "3x10", "--studies", "500"])
    out = capsys.readouterr().out
    assert "| hpl − sft | 2 x 3 | +13.3 |" in out
    with pytest.raises(ValueError, match="no \\(seed, task\\) cell"):
        difference_matrix(episodes, "hpl", "eto", "dev")
