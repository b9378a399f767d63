"""Golden tests of the reference-based losses beyond DPO, cDPO and IPO: robust DPO, hinge, EXO,
NCA, SPPO (hard), APO (zero and down), DPO-Positive and RPO. Every expected value is derived by
hand in the test's docstring (softplus(x) = log(1 + e^x), so -log sigma(x) = softplus(-x));
none was copied from running the code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.loss import Loss, PairLogps
from dpo.core.interfaces.plugins import collect, get_plugin_manager
from dpo.plugins.losses.apo import APODownLoss, APOZeroLoss
from dpo.plugins.losses.dpo import DPOLoss, RobustDPOLoss, dpo_loss, robust_loss
from dpo.plugins.losses.dpop import DPOPLoss
from dpo.plugins.losses.exo import ExoPairLoss, exo_pair_loss
from dpo.plugins.losses.hinge import HingeLoss
from dpo.plugins.losses.nca import NCAPairLoss
from dpo.plugins.losses.rpo import RPOLoss
from dpo.plugins.losses.sppo import SPPOHardLoss

LN2 = 0.6931471805599453
SP_M1 = 0.31326168751822286  # softplus(-1) = log(1 + e^-1) = log(1.3678794411714423)

NEW_LOSSES: dict[str, type[Loss]] = {
    "robust": RobustDPOLoss, "hinge": HingeLoss, "exo": ExoPairLoss, "nca": NCAPairLoss,
    "sppo_hard": SPPOHardLoss, "apo_zero": APOZeroLoss, "apo_down": APODownLoss,
    "dpop": DPOPLoss, "rpo": RPOLoss,
}


def logps(r_w: list[float], r_l: list[float], ref_w: float = -4.0, ref_l: float = -6.0,
          chosen_tokens: list[int] | None = None) -> PairLogps:
    """Pairs with the given log-ratios: policy = reference + r, float64, the policy tensors
    requiring grad (read ``.grad`` after ``backward``)."""
    n = len(r_w)

    def t(values: list[float], grad: bool = False) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, requires_grad=grad)

    return PairLogps(
        policy_chosen=t([ref_w + r for r in r_w], True),
        policy_rejected=t([ref_l + r for r in r_l], True),
        chosen_tokens=torch.tensor(chosen_tokens or [1] * n),
        rejected_tokens=torch.tensor([1] * n),
        ref_chosen=t([ref_w] * n), ref_rejected=t([ref_l] * n),
    )


def value(loss: Loss, r_w: float, r_l: float, **kw) -> float:
    return loss(logps([r_w], [r_l], **kw)).losses.item()


def grads(loss: Loss, r_w: float, r_l: float, **kw) -> tuple[float, float]:
    """d loss / d l_w and d loss / d l_l (policy log-probs) by autograd."""
    pairs = logps([r_w], [r_l], **kw)
    loss(pairs).loss.backward()
    return pairs.policy_chosen.grad.item(), pairs.policy_rejected.grad.item()


# -- (1) policy == reference: r_w = r_l = h = 0 --------------------------------------------------

@pytest.mark.parametrize("loss, expected", [
    (RobustDPOLoss(eps=0.1), LN2),
    (HingeLoss(), 1.0),
    (ExoPairLoss(), 2.761230709097915),
    (NCAPairLoss(), 2 * LN2),
    (SPPOHardLoss(beta=0.1), 50.0),
    (APOZeroLoss(), 1.0),
    (APODownLoss(), 1.0),
    (DPOPLoss(), LN2),
    (RPOLoss(alpha=1.0), LN2 + 2.0),
], ids=list(NEW_LOSSES))
def test_value_when_policy_equals_reference(loss, expected):
    """r_w = r_l = 0, h = 0, sigma(0) = 1/2, -log sigma(0) = ln 2 = 0.6931471805599453.
    robust: [-(1-eps) log(1/2) + eps log(1/2)] / (1-2eps) = (1-2eps) ln 2 / (1-2eps) = ln 2.
    hinge: max(0, 1 - beta*0) = 1.
    exo (eps = 1e-3): KL(Bern(1/2) || Bern(1-eps)) = 1/2 [log(1/2) - log(1-eps)]
        + 1/2 [log(1/2) - log eps] = -ln 2 - 1/2 [log(1-eps) + log eps];
        log(0.999) = -0.0010005003335835335, log(0.001) = -6.907755278982137, sum
        -6.908755779315721, half -3.4543778896578604; -0.6931471805599453 + 3.4543778896578604
        = 2.761230709097915.
    nca: -log sigma(0) - 1/2 log sigma(0) - 1/2 log sigma(0) = 2 ln 2 = 1.3862943611198906.
    sppo_hard (beta = 0.1, 1/(2 beta) = 5): (0 - 5)^2 + (0 + 5)^2 = 50.
    apo_zero: (1 - 1/2) + 1/2 = 1.  apo_down: 1/2 + (1 - 1/2) = 1.
    dpop: max(0, -0) = 0, so DPO's -log sigma(0) = ln 2.
    rpo (alpha = 1): ln 2 + NLL; l_w = ref_w = -4 over n_w = 2 tokens, NLL = 4/2 = 2.
    Rewards beta * 0 = 0 for every loss."""
    out = loss(logps([0.0, 0.0], [0.0, 0.0], chosen_tokens=[2, 2]))
    assert out.losses.tolist() == pytest.approx([expected, expected], abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.0, 0.0] and out.rejected_rewards.tolist() == [0.0, 0.0]


# -- (2) one known point each --------------------------------------------------------------------

def test_robust_known_point():
    """beta = 0.5, r_w = 1, r_l = -1: h = 2, z = beta h = 1, eps = 0.1.
    -log sigma(1) = softplus(-1) = 0.31326168751822286; -log sigma(-1) = softplus(1) = 1.3132616875182228.
    loss = [0.9 * 0.31326168751822286 - 0.1 * 1.3132616875182228] / 0.8
         = [0.2819355187664006 - 0.1313261687518223] / 0.8 = 0.1506093500145783 / 0.8
         = 0.18826168751822286.
    Rewards are beta * r: 0.5 and -0.5."""
    out = RobustDPOLoss(beta=0.5, eps=0.1)(logps([1.0], [-1.0]))
    assert out.losses.item() == pytest.approx(0.18826168751822286, abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.5] and out.rejected_rewards.tolist() == [-0.5]


def test_hinge_known_point():
    """beta = 0.5, r_w = 0.5, r_l = -0.5: h = 1, loss = max(0, 1 - 0.5) = 0.5.
    With h = 3: 1 - 1.5 < 0, loss 0."""
    assert value(HingeLoss(beta=0.5), 0.5, -0.5) == pytest.approx(0.5, abs=1e-12)
    assert value(HingeLoss(beta=0.5), 2.0, -1.0) == 0.0


def test_exo_known_point():
    """beta = 0.5, h = 2, z = 1, eps = 0.1: q = sigma(1) = 0.7310585786300049,
    1 - q = 0.2689414213699951, log q = -softplus(-1) = -0.31326168751822286,
    log(1-q) = -softplus(1) = -1.3132616875182228, log 0.9 = -0.10536051565782628,
    log 0.1 = -2.3025850929940455.
    q [log q - log 0.9] = 0.7310585786300049 * (-0.20790117186039658) = -0.15198793519577386
    (1-q) [log(1-q) - log 0.1] = 0.2689414213699951 * 0.9893234054758226 = 0.26607004286327174
    KL = 0.11408210766749788."""
    assert value(ExoPairLoss(beta=0.5, eps=0.1), 1.0, -1.0) == pytest.approx(
        0.11408210766749788, abs=1e-12)


def test_nca_known_point():
    """beta = 0.5, r_w = 1, r_l = -1: beta r_w = 0.5, beta r_l = -0.5.
    -log sigma(0.5) = softplus(-0.5) = 0.4740769841801067,
    -1/2 log sigma(-0.5) = 1/2 softplus(0.5) = 1/2 * 0.9740769841801067,
    -1/2 log sigma(0.5) = 1/2 softplus(-0.5);
    loss = 1.5 * 0.4740769841801067 + 0.5 * 0.9740769841801067
         = 0.71111547627016 + 0.48703849209005334 = 1.1981539683602134.
    It is not a function of h alone: r_w = 3, r_l = 1 (the same h = 2) gives another value."""
    loss = NCAPairLoss(beta=0.5)
    assert value(loss, 1.0, -1.0) == pytest.approx(1.1981539683602134, abs=1e-12)
    assert value(loss, 3.0, 1.0) != pytest.approx(1.1981539683602134, abs=1e-3)


def test_sppo_known_point_and_minimum():
    """beta = 0.5, 1/(2 beta) = 1. r_w = 0, r_l = 0.5: (0 - 1)^2 + (0.5 + 1)^2 = 1 + 2.25 = 3.25.
    At r_w = 1, r_l = -1: (1-1)^2 + (-1+1)^2 = 0, the minimum, where both gradients
    2 (r_w - 1) and 2 (r_l + 1) are 0."""
    loss = SPPOHardLoss(beta=0.5)
    assert value(loss, 0.0, 0.5) == pytest.approx(3.25, abs=1e-12)
    assert value(loss, 1.0, -1.0) == 0.0
    assert grads(loss, 1.0, -1.0) == (0.0, 0.0)


def test_apo_known_points():
    """beta = 0.5, r_w = 1, r_l = -1 (beta r_w = 0.5, beta r_l = -0.5, beta h = 1).
    apo_zero: (1 - sigma(0.5)) + sigma(-0.5) = 2 sigma(-0.5) = 2 (1 - 0.6224593312018546)
              = 2 * 0.3775406687981454 = 0.7550813375962908.
    apo_down: sigma(0.5) + (1 - sigma(1)) = 0.6224593312018546 + 0.2689414213699951
              = 0.8914007525718497."""
    assert value(APOZeroLoss(beta=0.5), 1.0, -1.0) == pytest.approx(0.7550813375962908, abs=1e-12)
    assert value(APODownLoss(beta=0.5), 1.0, -1.0) == pytest.approx(0.8914007525718497, abs=1e-12)


def test_dpop_known_points():
    """beta = 0.5, lambda = 2.
    r_w = -0.5 (policy below the reference on the chosen completion), r_l = -2.5: h = 2,
    penalty max(0, 0.5) = 0.5, margin h - lambda*0.5 = 2 - 1 = 1, beta * 1 = 0.5,
    loss = softplus(-0.5) = 0.4740769841801067 (DPO alone: softplus(-1) = 0.31326168751822286).
    r_w = 1, r_l = -1 (chosen above the reference): penalty 0, DPO's softplus(-1)."""
    loss = DPOPLoss(beta=0.5, dpop_lambda=2.0)
    assert value(loss, -0.5, -2.5) == pytest.approx(0.4740769841801067, abs=1e-12)
    assert value(loss, 1.0, -1.0) == pytest.approx(SP_M1, abs=1e-12)
    out = loss(logps([-0.5, 1.0], [-2.5, -1.0]))
    assert out.metrics["dpop/penalty"].tolist() == [0.5, 0.0]


def test_rpo_known_point_and_metrics():
    """beta = 0.5, alpha = 1, r_w = 1, r_l = -1 (h = 2, beta h = 1); ref_w = -2 so l_w = -1,
    over n_w = 4 tokens: NLL = 1/4 = 0.25. loss = softplus(-1) + 0.25 = 0.5632616875182229.
    alpha = 0.5: 0.31326168751822286 + 0.125 = 0.43826168751822286.
    Metrics: nll_loss 0.25, dpo_loss softplus(-1)."""
    out = RPOLoss(beta=0.5, alpha=1.0)(logps([1.0], [-1.0], ref_w=-2.0, chosen_tokens=[4]))
    assert out.losses.item() == pytest.approx(0.5632616875182229, abs=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(0.25, abs=1e-12)
    assert out.metrics["dpo_loss"].item() == pytest.approx(SP_M1, abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.5] and out.rejected_rewards.tolist() == [-0.5]
    half = RPOLoss(beta=0.5, alpha=0.5)
    assert value(half, 1.0, -1.0, ref_w=-2.0, chosen_tokens=[4]) == pytest.approx(
        0.43826168751822286, abs=1e-12)


# -- (3) gradients --------------------------------------------------------------------------------

def test_hinge_gradient_is_minus_beta_below_the_margin_and_zero_past_it():
    """d/dl_w max(0, 1 - beta h) = -beta while beta h < 1, 0 once beta h > 1 (d/dl_l the
    opposite). beta = 0.5: h = 1 gives (-0.5, 0.5); h = 3 gives (0, 0)."""
    assert grads(HingeLoss(beta=0.5), 0.5, -0.5) == pytest.approx((-0.5, 0.5), abs=1e-12)
    assert grads(HingeLoss(beta=0.5), 2.0, -1.0) == (0.0, 0.0)


def test_robust_gradient_keeps_pushing_the_margin_up():
    """d/dh robust = beta [-(1-eps)(1 - sigma(z)) - eps sigma(z)] / (1-2eps) < 0 for every z
    (both terms negative), unlike cDPO: beta = 0.5, eps = 0.1. At z = 1:
    0.5 [-0.9 * 0.2689414213699951 - 0.1 * 0.7310585786300049] / 0.8
    = 0.5 [-0.2420472792329956 - 0.07310585786300049] / 0.8 = -0.3151531370959961 / 1.6
    = -0.19697071068499756.
    At z = 10 (h = 20) still negative."""
    g_w, g_l = grads(RobustDPOLoss(beta=0.5, eps=0.1), 1.0, -1.0)
    assert g_w == pytest.approx(-0.19697071068499756, abs=1e-12) and g_l == pytest.approx(-g_w)
    assert grads(RobustDPOLoss(beta=0.5, eps=0.1), 10.0, -10.0)[0] < 0


def test_exo_gradient_vanishes_at_sigma_one_minus_eps():
    """d KL / dz = q (1-q) [logit q - logit(1-eps)], q = sigma(z): zero where q = 1 - eps.
    eps = 0.1, beta = 0.5: z = logit(0.9) = ln 9 = 2.1972245773362196, h = 2 ln 9; take
    r_w = ln 9, r_l = -ln 9. The KL itself is 0 there. Below it (h = 0) the gradient on l_w is
    negative (raise the margin), above it (h = 4 ln 9) positive (lower it)."""
    loss = ExoPairLoss(beta=0.5, eps=0.1)
    ln9 = math.log(9)
    g_w, g_l = grads(loss, ln9, -ln9)
    assert abs(g_w) < 1e-12 and abs(g_l) < 1e-12
    assert value(loss, ln9, -ln9) == pytest.approx(0.0, abs=1e-12)
    assert grads(loss, 0.0, 0.0)[0] < 0 < grads(loss, 2 * ln9, -2 * ln9)[0]


def test_nca_gradients():
    """d/dl_w = beta [-(1 - sigma(s_w)) + 1/2 sigma(s_w)], d/dl_l = beta/2 sigma(s_l), s = beta r.
    At r = 0, beta = 0.1: d/dl_w = 0.1 (-1/2 + 1/4) = -0.025 (raise the chosen),
    d/dl_l = 0.05 * 1/2 = 0.025 (lower the rejected)."""
    assert grads(NCAPairLoss(beta=0.1), 0.0, 0.0) == pytest.approx((-0.025, 0.025), abs=1e-12)


def test_sppo_gradients_point_to_the_minimum():
    """d/dl_w = 2 (r_w - 1/(2 beta)), d/dl_l = 2 (r_l + 1/(2 beta)); beta = 0.5, at r = 0:
    (-2, 2): raise the chosen, lower the rejected. Past the minimum (r_w = 3, r_l = -3):
    (4, -4): the chosen is pulled back down, the rejected back up."""
    assert grads(SPPOHardLoss(beta=0.5), 0.0, 0.0) == pytest.approx((-2.0, 2.0), abs=1e-12)
    assert grads(SPPOHardLoss(beta=0.5), 3.0, -3.0) == pytest.approx((4.0, -4.0), abs=1e-12)


def test_apo_gradients():
    """apo_zero: d/dl_w = -beta sigma'(beta r_w) < 0, d/dl_l = beta sigma'(beta r_l) > 0;
    at r = 0, beta = 0.1, sigma'(0) = 1/4: (-0.025, 0.025).
    apo_down: d/dl_w = beta [sigma'(beta r_w) - sigma'(beta h)], d/dl_l = beta sigma'(beta h).
    At r = 0 the chosen gradient is 0.1 (1/4 - 1/4) = 0 and the rejected 0.025. At beta = 0.5,
    r_w = 1, r_l = -1: sigma'(0.5) = 0.2350037122015945, sigma'(1) = 0.19661193324148185,
    d/dl_w = 0.5 * 0.038391778960112644 = 0.019195889480056322 > 0 (lower the chosen) and
    d/dl_l = 0.5 * 0.19661193324148185 = 0.09830596662074093 (lower the rejected more)."""
    assert grads(APOZeroLoss(beta=0.1), 0.0, 0.0) == pytest.approx((-0.025, 0.025), abs=1e-12)
    assert grads(APODownLoss(beta=0.1), 0.0, 0.0) == pytest.approx((0.0, 0.025), abs=1e-12)
    assert grads(APODownLoss(beta=0.5), 1.0, -1.0) == pytest.approx(
        (0.019195889480056322, 0.09830596662074093), abs=1e-12)


def test_dpop_multiplies_the_chosen_gradient_by_one_plus_lambda_below_the_reference():
    """With r_w < 0 the argument is beta [(1 + lambda) r_w - r_l], so d/dl_w =
    -beta (1 + lambda)(1 - sigma(.)) and d/dl_l = beta (1 - sigma(.)). beta = 0.5, lambda = 2,
    r_w = -0.5, r_l = -2.5: argument 0.5 (-1.5 + 2.5) = 0.5, 1 - sigma(0.5) = 0.3775406687981454;
    d/dl_w = -0.5 * 3 * 0.3775406687981454 = -0.566311003197218,
    d/dl_l = 0.5 * 0.3775406687981454 = 0.1887703343990727."""
    assert grads(DPOPLoss(beta=0.5, dpop_lambda=2.0), -0.5, -2.5) == pytest.approx(
        (-0.566311003197218, 0.1887703343990727), abs=1e-12)


def test_rpo_gradient_adds_minus_alpha_over_n_on_the_chosen():
    """d/dl_w = -beta (1 - sigma(beta h)) - alpha / n_w; d/dl_l = beta (1 - sigma(beta h)).
    beta = 0.5, h = 2, alpha = 1, n_w = 4: -0.5 * 0.2689414213699951 - 0.25 = -0.38447071068499755,
    d/dl_l = 0.13447071068499755."""
    assert grads(RPOLoss(beta=0.5), 1.0, -1.0, ref_w=-2.0, chosen_tokens=[4]) == pytest.approx(
        (-0.38447071068499755, 0.13447071068499755), abs=1e-12)


# -- (4) identities -------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_robust_equals_the_debiased_combination_of_dpo_losses_and_can_be_negative(eps):
    """robust(h) = [(1-eps) L_DPO(h) - eps L_DPO(-h)] / (1-2eps), L_DPO(-h) being DPO with the
    labels swapped. At beta h = 10 the first term is softplus(-10) = 4.54e-5 and the second
    eps softplus(10) = eps (10 + 4.54e-5): the loss is about -10 eps / (1-2eps) < 0."""
    beta = 0.5
    h = torch.tensor([-6.0, -1.0, 0.0, 0.5, 2.0, 20.0], dtype=torch.float64)
    expected = ((1 - eps) * dpo_loss(h, beta) - eps * dpo_loss(-h, beta)) / (1 - 2 * eps)
    assert torch.allclose(robust_loss(h, beta, eps), expected, atol=1e-12)
    big = robust_loss(torch.tensor([20.0], dtype=torch.float64), beta, eps).item()
    assert big < 0 and big == pytest.approx(-10 * eps / (1 - 2 * eps), abs=1e-3)


@pytest.mark.parametrize("eps", [1e-3, 0.1, 0.4])
def test_exo_equals_the_bernoulli_kl_written_out(eps):
    """KL(Bern(q) || Bern(p)) = q log(q/p) + (1-q) log((1-q)/(1-p)), q = sigma(beta h),
    p = 1 - eps, computed with plain floats for each h."""
    beta = 0.5
    hs = [-8.0, -1.0, 0.0, 1.0, 3.0, 12.0]
    got = exo_pair_loss(torch.tensor(hs, dtype=torch.float64), beta, eps).tolist()
    for h, g in zip(hs, got):
        q = 1 / (1 + math.exp(-beta * h))
        p = 1 - eps
        assert g == pytest.approx(q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p)),
                                  abs=1e-12)
        assert g >= 0


def test_exo_stays_finite_where_sigmoid_saturates():
    """beta h = +-200 (beta = 0.1): sigma(200) rounds to 1 and log(1 - sigma(200)) would be
    log 0, but the logsigmoid form keeps the KL finite. At +200, q = 1: KL = -log(1-eps)
    = 0.0010005003335835335 (eps = 1e-3). At -200, q = e^-200 (its term q (-200 - log 0.999)
    is ~1e-85): KL = 1 * (log 1 - log eps) = -log 0.001 = 6.907755278982137."""
    out = exo_pair_loss(torch.tensor([2000.0, -2000.0], dtype=torch.float64), 0.1, 1e-3)
    assert out.tolist() == pytest.approx([0.0010005003335835335, 6.907755278982137], abs=1e-12)


def test_dpop_with_zero_lambda_is_dpo_and_rpo_with_zero_alpha_is_dpo():
    pairs = logps([-1.5, 0.25, 2.0], [0.5, -1.0, 3.0])
    dpo = DPOLoss(beta=0.3)(pairs).losses
    assert torch.allclose(DPOPLoss(beta=0.3, dpop_lambda=0.0)(pairs).losses, dpo, atol=1e-15)
    assert torch.allclose(RPOLoss(beta=0.3, alpha=0.0)(pairs).losses, dpo, atol=1e-15)


# -- options, registration, command line ----------------------------------------------------------

@pytest.mark.parametrize("cls, values, message", [
    (RobustDPOLoss, {"eps": "0.5"}, "loss 'robust': option eps=0.5"),
    (RobustDPOLoss, {"eps": "0"}, "loss 'robust': option eps=0"),
    (ExoPairLoss, {"eps": "0"}, "loss 'exo': option eps=0"),
    (DPOPLoss, {"dpop_lambda": "-1"}, "loss 'dpop': option dpop_lambda=-1"),
    (DPOPLoss, {"lambda": "5"}, "unknown option 'lambda' (valid: beta, dpop_lambda)"),
    (RPOLoss, {"alpha": "-0.1"}, "loss 'rpo': option alpha=-0.1"),
    (HingeLoss, {"beta": "0"}, "loss 'hinge': option beta=0"),
])
def test_bad_options_are_one_line_errors(cls, values, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cls.parse_options(values)


@pytest.mark.parametrize("loss, option, message", [
    ("dpop", "lambda=5", "error: loss 'dpop': unknown option 'lambda' (valid: beta, dpop_lambda)"),
    ("exo", "eps=0.5", "error: loss 'exo': option eps=0.5: Input should be less than 0.5"),
    ("rpo", "alpha=x", "error: loss 'rpo': option alpha=x:"),
])
def test_a_bad_option_on_the_command_line_is_one_line_and_writes_nothing(loss, option, message,
                                                                          invoke, pairs, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "--model", "tiny", "--data", str(pairs), "--loss", loss, "-o", option,
                    "--output", str(out))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(message), result.output
    assert not out.exists()


def test_every_new_loss_is_registered_by_its_module_and_needs_a_reference():
    pm = get_plugin_manager(load_entrypoints=False)
    catalog = collect(pm)
    assert not pm.failures
    for name, cls in NEW_LOSSES.items():
        assert catalog.losses.get(name) is cls and cls.requires_reference
        with pytest.raises(ValueError, match=f"loss '{name}' needs reference log-probs"):
            cls()(PairLogps(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1)))


OPTIONS = {
    "robust": {"beta": 0.1, "eps": 0.1}, "hinge": {"beta": 0.1},
    "exo": {"beta": 0.1, "eps": 0.001}, "nca": {"beta": 0.1}, "sppo_hard": {"beta": 0.1},
    "apo_zero": {"beta": 0.1}, "apo_down": {"beta": 0.1},
    "dpop": {"beta": 0.1, "dpop_lambda": 50.0}, "rpo": {"beta": 0.1, "alpha": 1.0},
}


def test_dpo_plugins_lists_every_new_loss_with_its_options(invoke):
    result = invoke("plugins", "--json")
    assert result.exit_code == 0, result.output
    listed = {}
    for plugin in json.loads(result.output)["plugins"]:
        listed.update(plugin["options"].get("dpo_register_losses", {}))
    assert {name: listed.get(name) for name in OPTIONS} == OPTIONS
    table = invoke("plugins")
    assert table.exit_code == 0
    for name, defaults in OPTIONS.items():
        shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
        assert f"{name} ({shown})" in table.output


# The first step's loss, where the policy still equals the reference (h = 0), is the value of
# test_value_when_policy_equals_reference at beta = 0.1 (float32 here): for rpo it is
# ln 2 plus the logged nll_loss.
FIRST_LOSS = {
    "robust": LN2, "hinge": 1.0, "exo": 2.761230709097915, "nca": 2 * LN2, "sppo_hard": 50.0,
    "apo_zero": 1.0, "apo_down": 1.0, "dpop": LN2, "rpo": None,
}


@pytest.mark.parametrize("name", list(NEW_LOSSES))
def test_a_two_step_run_logs_finite_losses(name, invoke, tmp_path):
    data = Path(__file__).resolve().parents[1] / "examples" / "pairs.jsonl"
    out = tmp_path / "out"
    result = invoke("run", "--model", "tiny", "--data", str(data), "--backend", "cpu",
                    "--loss", name, "--max-steps", "2", "--batch-size", "2",
                    "--output", str(out))
    assert result.exit_code == 0, result.output
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in steps)
    first = steps[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0
    expected = FIRST_LOSS[name] if name != "rpo" else LN2 + first["nll_loss"]
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    if name == "rpo":
        assert first["dpo_loss"] == pytest.approx(LN2, rel=1e-5) and first["nll_loss"] > 0
    if name == "dpop":
        assert first["dpop/penalty"] == 0.0
