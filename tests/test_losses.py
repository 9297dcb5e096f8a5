"""The loss math, without a model."""

import math

import pytest
import torch

from hpl_lightning.losses import hierarchical_loss, masked_mean, preference_loss


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


def test_absent_level_contributes_nothing_and_no_nan():
    values = torch.tensor([1.0, 2.0], requires_grad=True)
    empty = masked_mean(values, torch.tensor([False, False]))
    assert empty.item() == 0.0 and not torch.isnan(empty)
    empty.backward()
    assert values.grad.tolist() == [0.0, 0.0]


def test_hierarchical_weights_and_missing_levels():
    terms = {"traj": torch.tensor(1.0), "group": torch.tensor(3.0)}
    total = hierarchical_loss(terms, torch.tensor(0.5), {"bc": 2.0, "traj": 1.0, "step": 7.0, "group": 0.5})
    assert total.item() == pytest.approx(2 * 0.5 + 1.0 + 0.5 * 3.0)
    with pytest.raises(ValueError):
        hierarchical_loss({}, None, {})
