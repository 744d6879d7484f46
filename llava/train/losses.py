"""Preference losses as pure functions of summed response log-probabilities (METHOD.md).

The implicit reward of a condition is ``R(cond) = log pi(cond) - log pi_ref(cond)``. Each MCM-DPO
term prefers the all-winning condition ``cw_mw_yw`` to one loser; its margin is
``M_k = R(cw_mw_yw) - R(loser_k)``. Metrics are per-example tensors, detached, in reward units
(multiplied by ``beta``), under the names the trainer logs.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

CHOSEN = "cw_mw_yw"
REJECTED = "cw_mw_yl"
# term -> the condition it prefers cw_mw_yw to, in the order of METHOD.md's table
TERM_LOSERS: dict[str, str] = {
    "response": "cw_mw_yl",
    "image": "cw_ml_yw",
    "context": "cl_mw_yw",
    "context_response": "cl_mw_yl",
    "image_response": "cw_ml_yl",
    "context_image": "cl_ml_yw",
    "all": "cl_ml_yl",
}
TERMS = tuple(TERM_LOSERS)
# published flag of each term's weight, and its default
TERM_FLAGS = {"context": "para_r1", "image": "para_r2", "response": "para_r3", "context_response": "para_r4",
              "image_response": "para_r5", "context_image": "para_r6", "all": "para_r7"}
DEFAULT_WEIGHTS = {"response": 1.0, "image": 0.5, "context": 0.5, "context_response": 0.2,
                   "image_response": 0.2, "context_image": 0.2, "all": 0.2}
# `--use_cl_reward_num N` switches a term on when N exceeds its threshold (response and image: always)
TERM_THRESHOLDS = {"response": 0, "image": 0, "context": 2, "context_response": 3, "image_response": 4,
                   "context_image": 5, "all": 6}
AGGREGATES = ("margin", "loss")

Metrics = dict[str, torch.Tensor]


def term_weights(use_cl_reward_num: int, para_r: Mapping[str, float]) -> dict[str, float]:
    """Weights of the seven terms from ``--use_cl_reward_num`` and ``--para_r1..7`` (``para_r`` by flag name).

    A term that ``use_cl_reward_num`` leaves off has weight 0.
    """
    if not 1 <= use_cl_reward_num <= 7:
        raise ValueError(f"--use_cl_reward_num must be in 1..7, got {use_cl_reward_num}")
    return {t: float(para_r[TERM_FLAGS[t]]) if use_cl_reward_num > TERM_THRESHOLDS[t] else 0.0 for t in TERMS}


def needed_conditions(weights: Mapping[str, float]) -> tuple[str, ...]:
    """The conditions a loss with these weights reads: the chosen one and each active term's loser."""
    from llava.constants import CONDITIONS

    used = {CHOSEN, REJECTED} | {TERM_LOSERS[t] for t, w in weights.items() if w != 0}
    return tuple(c for c in CONDITIONS if c in used)


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
    margins = {t: reward[CHOSEN] - reward[TERM_LOSERS[t]] for t in active}
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
