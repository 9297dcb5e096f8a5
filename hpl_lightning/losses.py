"""HPL's losses as pure functions of summed log-probabilities: testable without a model.

Naming follows TRL's DPO trainer: the implicit reward of a continuation is ``beta * (log pi - log pi_ref)``;
``margin`` is chosen minus rejected reward; ``accuracy`` is the share of pairs whose margin is positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo", "hinge"]
LEVEL_KEYS: dict[str, str] = {"trajectory": "traj", "step": "step", "group": "group"}


@dataclass
class PreferenceOutput:
    """Per-pair values; callers reduce (mean over a level's pairs) and log them."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracies(self) -> torch.Tensor:
        return (self.margins > 0).float()


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.3,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> PreferenceOutput:
    """DPO (``sigmoid``, with conservative label smoothing), IPO and hinge losses per pair.

    ``h = (log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l))`` on summed log-probs of the agent's tokens.
    sigmoid: ``-(1-eps) log s(beta h) - eps log s(-beta h)``; hinge: ``max(0, 1 - beta h)``; ipo:
    ``(h' - 1/(2 beta))^2`` where ``h'`` uses per-token log-ratios (divided by ``chosen_tokens``/``rejected_tokens``),
    as TRL does, so the squared loss does not grow with the length of the continuation.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the number of scored tokens of each continuation")
        h_per_token = chosen_logratios / chosen_tokens.clamp_min(1) - rejected_logratios / rejected_tokens.clamp_min(1)
        losses = (h_per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected sigmoid, ipo or hinge")
    return PreferenceOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def objective_share(
    sums: dict[str, torch.Tensor], denominators: dict[str, torch.Tensor | float], weights: dict[str, float]
) -> torch.Tensor:
    """One micro-batch's share of ``L = w_bc L_BC + w_traj L_traj + w_step L_step + w_group L_group``.

    Each ``L_k`` is a mean over a whole optimizer step (all micro-batches of the accumulation, all ranks): ``sums[k]``
    is this micro-batch's sum of term ``k`` (pair losses of a level; summed NLL of behaviour-cloning tokens) and
    ``denominators[k]`` the step's number of such terms (pairs; tokens). Summed over the step's micro-batches and
    ranks the shares are ``L`` exactly, whatever the batch size, accumulation or device count; a level absent from
    the step adds nothing. With one micro-batch as the step, each ``L_k`` is the batch mean.
    """
    if not sums:
        raise ValueError("a batch with neither preference pairs nor behaviour-cloning sequences")
    return sum(weights.get(key, 1.0) * value / denominators[key] for key, value in sums.items())
