"""Losses as pure functions of summed response log-probabilities, and the objectives built on them.

The implicit reward of a condition is ``R(cond) = log pi(cond) - log pi_ref(cond)``. Each MCM-DPO
term prefers the all-winning condition to one loser (``llava.method.TERMS``); its margin is
``M_k = R(chosen) - R(loser_k)`` (docs/method.md, "Terms"). Metrics are per-example tensors,
detached, in reward units (multiplied by ``beta``), under the names the trainer logs.

The objectives (``SFTObjective``, ``DPOObjective``, ``MCMObjective``) say which conditions a run
scores and whether it needs a reference, and turn labelled log-probabilities into a loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, get_args

import torch
import torch.nn.functional as F

from llava.method import (CHOSEN, DPO_CONDITIONS, REJECTED, SFT_CONDITION, TERM_BY_NAME, ConditionLogps,
                          needed_conditions)
from llava.method import metric_names as logged_metrics

Aggregate = Literal["margin", "loss"]  # one sigmoid over the weighted margins, or a weighted sum of DPO losses
AGGREGATES: tuple[str, ...] = get_args(Aggregate)

Metrics = dict[str, torch.Tensor]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, Metrics]:
    """Plain DPO: ``-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))``, per example ``[B]``."""
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    losses = -F.logsigmoid(beta * (chosen - rejected))
    chosen_reward, rejected_reward = (beta * chosen).detach(), (beta * rejected).detach()
    return losses, {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).to(chosen_reward.dtype),
        "rewards/margins": chosen_reward - rejected_reward,
    }


def mcm_dpo_loss(policy_logps: Mapping[str, torch.Tensor], reference_logps: Mapping[str, torch.Tensor], *,
                 weights: Mapping[str, float], norm: float = 2.8, beta: float = 0.1,
                 aggregate: str = "margin") -> tuple[torch.Tensor, Metrics]:
    """MCM-DPO over the eight conditions; returns the per-example loss ``[B]`` and the metrics.

    ``aggregate="margin"`` (the released objective): one Bradley-Terry sigmoid over the weighted
    margins, ``-log sigmoid(beta * sum_k (w_k / norm) M_k)``. ``aggregate="loss"``: the weighted
    sum of separate DPO losses, ``sum_k (w_k / norm) * -log sigmoid(beta * M_k)``.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    active = {t: w for t, w in weights.items() if w != 0}
    if not active:
        raise ValueError("every MCM-DPO term has weight 0")
    reward = {c: policy_logps[c] - reference_logps[c] for c in needed_conditions(active)}
    margins = {t: reward[CHOSEN] - reward[TERM_BY_NAME[t].loser] for t in active}
    if aggregate == "margin":
        losses = -F.logsigmoid(beta * sum(w / norm * margins[t] for t, w in active.items()))
    else:
        losses = sum(w / norm * -F.logsigmoid(beta * margins[t]) for t, w in active.items())
    _, metrics = dpo_loss(policy_logps[CHOSEN], policy_logps[REJECTED], reference_logps[CHOSEN],
                          reference_logps[REJECTED], beta)
    for t in active:
        m = (beta * margins[t]).detach()
        metrics[f"mcm/{t}/margin"] = m
        metrics[f"mcm/{t}/accuracy"] = (m > 0).to(m.dtype)
    for c, r in reward.items():
        metrics[f"mcm/reward/{c}"] = (beta * r).detach()
    return losses, metrics


# ---------------------------------------------------------------------------------------------
# Objectives: what a step computes from the policy's (and the reference's) labelled log-probs


@dataclass(frozen=True)
class SFTObjective:
    """Mean negative log-likelihood of the answer tokens of the micro-batch."""

    conditions = (SFT_CONDITION,)
    needs_reference = False
    metric_names = logged_metrics("sft")

    def __call__(self, policy: ConditionLogps, reference: ConditionLogps | None, batch: dict) -> tuple[torch.Tensor, Metrics]:
        return -policy[SFT_CONDITION].sum() / batch["logp_mask"].sum().clamp(min=1), {}


@dataclass(frozen=True)
class DPOObjective:
    beta: float = 0.1
    conditions = DPO_CONDITIONS
    needs_reference = True
    metric_names = logged_metrics("dpo")

    def __call__(self, policy: ConditionLogps, reference: ConditionLogps, batch: dict) -> tuple[torch.Tensor, Metrics]:
        losses, metrics = dpo_loss(policy[CHOSEN], policy[REJECTED], reference[CHOSEN], reference[REJECTED], self.beta)
        return losses.mean(), metrics


@dataclass(frozen=True)
class MCMObjective:
    weights: Mapping[str, float]
    norm: float = 2.8
    beta: float = 0.1
    aggregate: str = "margin"
    needs_reference = True

    @property
    def conditions(self) -> tuple[str, ...]:
        return needed_conditions(self.weights)

    @property
    def metric_names(self) -> list[str]:
        return logged_metrics("mcm", self.conditions, self.weights)

    def __call__(self, policy: ConditionLogps, reference: ConditionLogps, batch: dict) -> tuple[torch.Tensor, Metrics]:
        losses, metrics = mcm_dpo_loss(policy.as_dict(), reference.as_dict(), weights=self.weights, norm=self.norm,
                                       beta=self.beta, aggregate=self.aggregate)
        return losses.mean(), metrics
