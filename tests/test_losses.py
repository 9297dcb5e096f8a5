"""The loss math, without a model."""

import math

import pytest
import torch

from hpl_lightning.losses import objective_share, preference_loss


def _logps():
    return (torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]), torch.tensor([-11.0, -4.0]),
            torch.tensor([-11.0, -4.0]))


def test_dpo_sigmoid_matches_closed_form():
    pc, pr, rc, rr = _logps()
    out = preference_loss(pc, pr, rc, rr, beta=0.3)
    h = torch.tensor([(-10 + 11) - (-12 + 11), (-4 + 4) - (-3 + 4)])
    expected = [math.log1p(math.exp(-0.3 * v)) for v in h.tolist()]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.3, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.3, 0.3])
    assert out.accuracies.tolist() == [1.0, 0.0]
    assert out.margins.tolist() == pytest.approx([0.6, -0.3])


def test_label_smoothing_is_conservative_dpo():
    pc, pr, rc, rr = _logps()
    eps = 0.1
    out = preference_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=eps)
    h = 0.3 * torch.tensor([2.0, -1.0])
    expected = -(1 - eps) * torch.nn.functional.logsigmoid(h) - eps * torch.nn.functional.logsigmoid(-h)
    assert torch.allclose(out.losses, expected)


def test_ipo_is_per_token_and_hinge():
    pc, pr, rc, rr = _logps()
    n_c, n_r = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])
    ipo = preference_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", chosen_tokens=n_c, rejected_tokens=n_r)
    h = torch.tensor([1 / 2 - (-1) / 1, 0 / 4 - 1 / 2])
    assert torch.allclose(ipo.losses, (h - 1.0) ** 2)
    hinge = preference_loss(pc, pr, rc, rr, beta=0.3, loss_type="hinge")
    assert torch.allclose(hinge.losses, torch.relu(1 - 0.3 * torch.tensor([2.0, -1.0])))
    with pytest.raises(ValueError, match="ipo"):
        preference_loss(pc, pr, rc, rr, loss_type="ipo")


def test_level_means_over_the_step_whatever_the_micro_batches():
    """Each level is the mean over its pairs in the whole step: split into micro-batches, the shares add up to it."""
    weights = {"bc": 2.0, "traj": 1.0, "step": 7.0, "group": 0.5}
    traj, group, bc_nll = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 4.0, 6.0]), torch.tensor([5.0, 7.0])
    denominators = {"traj": 2, "step": 0, "group": 3, "bc": 10}  # bc: a mean over the step's 10 agent tokens
    expected = 2.0 * 12 / 10 + 1.0 * 2.0 + 0.5 * 4.0  # step absent from the step: adds nothing
    whole = objective_share({"traj": traj.sum(), "group": group.sum(), "bc": bc_nll.sum()}, denominators, weights)
    assert whole.item() == pytest.approx(expected)
    # the same pairs in three micro-batches, one without any trajectory pair
    parts = [
        {"traj": traj[:1].sum(), "group": group[:2].sum()},
        {"group": group[2:].sum(), "bc": bc_nll[:1].sum()},
        {"traj": traj[1:].sum(), "bc": bc_nll[1:].sum()},
    ]
    assert sum(objective_share(p, denominators, weights).item() for p in parts) == pytest.approx(expected)
    with pytest.raises(ValueError):
        objective_share({}, denominators, weights)


def test_logged_means_are_the_objective_over_what_was_summed():
    """Two batches' sums: trajectory pairs 0.4 + 1.6 over 1 + 3 pairs, no step pair, group 3.0 over 2, behaviour
    cloning 30 nats over 10 tokens. Means per level over all its terms, not per batch; an absent level has none."""
    from hpl_lightning.module import PAIR_STATS, ROWS, LevelSums, level_means

    sums = LevelSums()
    for traj, group, bc in (((0.4, 1.0), (0.0, 0.0), (10.0, 4.0)), ((1.6, 3.0), (3.0, 2.0), (20.0, 6.0))):
        table, counts = torch.zeros(len(ROWS), len(PAIR_STATS), dtype=torch.float64), torch.zeros(len(ROWS))
        for key, (total, n) in (("traj", traj), ("group", group), ("bc", bc)):
            table[ROWS.index(key), 0], counts[ROWS.index(key)] = total, n
        sums.update(table, counts.double())
    values = level_means(*sums.compute(), {"traj": 1.0, "step": 1.0, "group": 0.5, "bc": 1.0})
    assert not any(k.startswith("step/") for k in values)
    assert values["traj/loss"].item() == pytest.approx(0.5)  # 2.0 / 4 pairs (the batch means 0.4 and 0.53 average 0.47)
    assert values["group/loss"].item() == pytest.approx(1.5)
    assert values["bc/loss"].item() == pytest.approx(3.0)
    assert values["loss"].item() == pytest.approx(0.5 + 0.5 * 1.5 + 3.0)
