"""Losses against an independent float64 computation written out by hand."""

import math
import random

import pytest
import torch

from llava.method import CONDITION_NAMES as CONDITIONS
from llava.method import TERM_NAMES as TERMS
from llava.method import needed_conditions
from llava.train.released_flags import released_term_weights as term_weights
from llava.train.losses import dpo_loss, mcm_dpo_loss

PARA = {"para_r1": 0.5, "para_r2": 0.5, "para_r3": 1.0, "para_r4": 0.2, "para_r5": 0.2, "para_r6": 0.2, "para_r7": 0.2}
# (term, loser, published weight flag), written out from the paper's table (docs/method.md#terms)
TABLE = [
    ("response", "cw_mw_yl", "para_r3"),
    ("image", "cw_ml_yw", "para_r2"),
    ("context", "cl_mw_yw", "para_r1"),
    ("context_response", "cl_mw_yl", "para_r4"),
    ("image_response", "cw_ml_yl", "para_r5"),
    ("context_image", "cl_ml_yw", "para_r6"),
    ("all", "cl_ml_yl", "para_r7"),
]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def random_logps(batch, seed):
    g = torch.Generator().manual_seed(seed)
    policy = {c: -50 * torch.rand(batch, generator=g, dtype=torch.float64) for c in CONDITIONS}
    reference = {c: -50 * torch.rand(batch, generator=g, dtype=torch.float64) for c in CONDITIONS}
    return policy, reference


def naive_mcm(policy, reference, weights, norm, beta, aggregate, b):
    r = {c: float(policy[c][b]) - float(reference[c][b]) for c in CONDITIONS}
    margins = {term: r["cw_mw_yw"] - r[loser] for term, loser, _ in TABLE}
    if aggregate == "margin":
        z = sum(weights[t] / norm * margins[t] for t, _, _ in TABLE)
        return -log_sigmoid(beta * z), margins
    return sum(weights[t] / norm * -log_sigmoid(beta * margins[t]) for t, _, _ in TABLE), margins


@pytest.mark.parametrize("aggregate", ["margin", "loss"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcm_dpo_loss_matches_float64_by_hand(aggregate, seed):
    rng = random.Random(seed)
    for mask in range(1, 2**7):  # every non-empty subset of the seven terms
        weights = {t: (rng.uniform(0.1, 2.0) if mask >> i & 1 else 0.0) for i, t in enumerate(TERMS)}
        norm, beta = rng.uniform(0.5, 4.0), rng.choice([0.05, 0.1, 0.5])
        policy, reference = random_logps(4, seed * 1000 + mask)
        losses, metrics = mcm_dpo_loss(policy, reference, weights=weights, norm=norm, beta=beta, aggregate=aggregate)
        assert losses.shape == (4,)
        for b in range(4):
            expected, margins = naive_mcm(policy, reference, weights, norm, beta, aggregate, b)
            assert losses[b].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
            for t, w in weights.items():
                if w:
                    assert metrics[f"mcm/{t}/margin"][b].item() == pytest.approx(beta * margins[t], rel=1e-12, abs=1e-12)
                    assert metrics[f"mcm/{t}/accuracy"][b].item() == float(margins[t] > 0)
                else:
                    assert f"mcm/{t}/margin" not in metrics


def test_mcm_terms_off_do_not_read_their_conditions():
    policy, reference = random_logps(3, 7)
    weights = {t: 0.0 for t in TERMS} | {"response": 1.0, "image": 0.5}
    for c in ("cl_mw_yw", "cl_mw_yl", "cl_ml_yw", "cl_ml_yl", "cw_ml_yl"):
        del policy[c], reference[c]
    losses, metrics = mcm_dpo_loss(policy, reference, weights=weights, norm=2.8, beta=0.1)
    assert torch.isfinite(losses).all()
    assert needed_conditions(weights) == ("cw_mw_yw", "cw_mw_yl", "cw_ml_yw")


def test_mcm_gradient_matches_float64_autograd_of_the_formula():
    policy, reference = random_logps(2, 3)
    policy = {c: v.clone().requires_grad_(True) for c, v in policy.items()}
    weights = {t: 1.0 for t in TERMS}
    losses, _ = mcm_dpo_loss(policy, reference, weights=weights, norm=7.0, beta=0.1)
    losses.sum().backward()
    # d loss / d pi(cw_mw_yw) = -beta * sigmoid(-beta z) * sum_k w_k / norm
    for b in range(2):
        r = {c: policy[c][b].item() - reference[c][b].item() for c in CONDITIONS}
        z = sum((r["cw_mw_yw"] - r[loser]) / 7.0 for _, loser, _ in TABLE)
        s = 1 / (1 + math.exp(0.1 * z))
        assert policy["cw_mw_yw"].grad[b].item() == pytest.approx(-0.1 * s * 7 / 7.0, rel=1e-10)
        assert policy["cl_ml_yl"].grad[b].item() == pytest.approx(0.1 * s / 7.0, rel=1e-10)


def test_mcm_rewards_are_the_published_four():
    policy, reference = random_logps(5, 11)
    _, metrics = mcm_dpo_loss(policy, reference, weights=term_weights(7, PARA), norm=2.8, beta=0.1)
    chosen = 0.1 * (policy["cw_mw_yw"] - reference["cw_mw_yw"])
    rejected = 0.1 * (policy["cw_mw_yl"] - reference["cw_mw_yl"])
    torch.testing.assert_close(metrics["rewards/chosen"], chosen)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected)
    torch.testing.assert_close(metrics["rewards/margins"], chosen - rejected)
    torch.testing.assert_close(metrics["rewards/accuracies"], (chosen > rejected).double())
    for c in CONDITIONS:
        torch.testing.assert_close(metrics[f"mcm/reward/{c}"], 0.1 * (policy[c] - reference[c]))


@pytest.mark.parametrize("seed", range(3))
def test_dpo_loss_matches_float64_by_hand(seed):
    policy, reference = random_logps(6, seed)
    losses, metrics = dpo_loss(policy["cw_mw_yw"], policy["cw_mw_yl"], reference["cw_mw_yw"], reference["cw_mw_yl"], beta=0.3)
    for b in range(6):
        pw, pl = float(policy["cw_mw_yw"][b]), float(policy["cw_mw_yl"][b])
        rw, rl = float(reference["cw_mw_yw"][b]), float(reference["cw_mw_yl"][b])
        assert losses[b].item() == pytest.approx(-log_sigmoid(0.3 * ((pw - rw) - (pl - rl))), rel=1e-12)
        assert metrics["rewards/chosen"][b].item() == pytest.approx(0.3 * (pw - rw), rel=1e-12)
        assert metrics["rewards/rejected"][b].item() == pytest.approx(0.3 * (pl - rl), rel=1e-12)
    assert not metrics["rewards/chosen"].requires_grad


def test_mcm_with_only_the_response_term_is_dpo_scaled_by_its_weight():
    policy, reference = random_logps(4, 5)
    weights = {t: 0.0 for t in TERMS} | {"response": 2.8}
    mcm, _ = mcm_dpo_loss(policy, reference, weights=weights, norm=2.8, beta=0.1)
    dpo, _ = dpo_loss(policy["cw_mw_yw"], policy["cw_mw_yl"], reference["cw_mw_yw"], reference["cw_mw_yl"], beta=0.1)
    torch.testing.assert_close(mcm, dpo)


@pytest.mark.parametrize("n", range(1, 8))
def test_use_cl_reward_num_switches_terms_in_method_order(n):
    weights = term_weights(n, PARA)
    # response and image always; N > 2 context; > 3 context+response; > 4 image+response; > 5 context+image; > 6 all
    expected_on = {"response", "image"} | {t for t, k in [("context", 2), ("context_response", 3), ("image_response", 4),
                                                           ("context_image", 5), ("all", 6)] if n > k}
    assert {t for t, w in weights.items() if w} == expected_on
    for term, _, flag in TABLE:
        assert weights[term] == (PARA[flag] if term in expected_on else 0.0)


@pytest.mark.parametrize("n", [0, 8, -1])
def test_use_cl_reward_num_outside_1_to_7_is_an_error(n):
    with pytest.raises(ValueError, match="use_cl_reward_num must be in 1..7"):
        term_weights(n, PARA)


def test_the_method_table_is_the_papers():
    """llava.method's terms (losers, defaults) and the released flags' mapping and thresholds
    (llava.train.released_flags) against the table written out here."""
    from llava.method import CONDITIONS as FACTORS
    from llava.method import DEFAULT_NORM, TERMS as METHOD_TERMS
    from llava.train.arguments import TrainingArguments
    from llava.train.released_flags import FLAG_OF, THRESHOLD

    assert [(t.name, t.loser, FLAG_OF[t.name]) for t in METHOD_TERMS] == TABLE
    assert {FLAG_OF[t.name]: t.default_weight for t in METHOD_TERMS} == PARA
    assert [THRESHOLD[t.name] for t in METHOD_TERMS] == [0, 0, 2, 3, 4, 5, 6]
    assert DEFAULT_NORM == pytest.approx(2.8) and sum(PARA.values()) == pytest.approx(2.8)
    # the eight conditions: every (context, image, response) choice once, context outermost
    assert CONDITIONS == ("cw_mw_yw", "cw_mw_yl", "cw_ml_yw", "cw_ml_yl", "cl_mw_yw", "cl_mw_yl", "cl_ml_yw", "cl_ml_yl")
    assert [(k.context, k.image, k.response) for k in FACTORS] == [(c, m, y) for c in "wl" for m in "wl" for y in "wl"]
    # the trainer's flags default to the paper's weights and norm
    args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True)
    assert {flag: getattr(args, flag) for flag in PARA} == PARA and args.para_norm == pytest.approx(2.8)


def test_unknown_aggregate_and_all_off_are_errors():
    policy, reference = random_logps(1, 0)
    with pytest.raises(ValueError, match="aggregate"):
        mcm_dpo_loss(policy, reference, weights=term_weights(7, PARA), aggregate="mean")
    with pytest.raises(ValueError, match="weight 0"):
        mcm_dpo_loss(policy, reference, weights={t: 0.0 for t in TERMS})


@pytest.mark.parametrize("n", [2, 5, 7])
def test_objectives_log_the_names_the_method_table_announces(n):
    from llava.method import ConditionLogps
    from llava.train.losses import DPOObjective, MCMObjective

    for objective in (MCMObjective(term_weights(n, PARA)), DPOObjective()):
        policy, reference = random_logps(3, n)
        as_logps = lambda d: ConditionLogps(torch.stack([d[c] for c in objective.conditions], 1), objective.conditions)  # noqa: E731
        _, metrics = objective(as_logps(policy), as_logps(reference), {})
        assert sorted(metrics) == sorted(objective.metric_names)


def test_one_step_with_a_cached_reference_needs_no_trainer(tmp_path):
    """``step_loss``: a model returning ``[B, C]`` and a reference table looked up by record index give
    the loss written out by hand (``naive_mcm``); the reference's ``logps`` takes the batch alone."""
    from llava.method import CONDITION_NAMES
    from llava.train.losses import MCMObjective
    from llava.train.step import CachedReference, step_loss

    objective = MCMObjective(term_weights(7, PARA), norm=2.8, beta=0.1)
    names = objective.conditions
    assert set(names) == set(CONDITION_NAMES)
    policy, reference = random_logps(5, 11)
    index = torch.tensor([3, 0, 4])  # the batch's records, in the table's row order
    table = torch.stack([reference[c] for c in names], 1)
    cached = CachedReference(tmp_path, {"conditions": list(names)})
    cached.table = table  # what prepare() computes or reads before step 1

    def model(conditions, input_ids, index):  # stands for the ScoringModel: [B, C] in ``conditions`` order
        return torch.stack([policy[c][index] for c in conditions], 1)

    batch = {"conditions": names, "input_ids": torch.zeros(3, 1, dtype=torch.long), "index": index}
    loss, logps, _ = step_loss(model, batch, objective, cached)
    expected = [naive_mcm(policy, reference, term_weights(7, PARA), 2.8, 0.1, "margin", int(b))[0] for b in index]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-12)
    assert logps.names == names and torch.equal(logps["cw_ml_yl"], policy["cw_ml_yl"][index])
