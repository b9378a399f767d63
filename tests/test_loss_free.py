"""Golden tests of the reference-free losses: SimPO, ORPO and SFT on pairs. Every expected value
is derived by hand in the test's docstring; none was copied from running the code."""

from __future__ import annotations

import math

import pytest
import torch

from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.loss import PairLogps
from dpo.core.interfaces.plugins import DEFAULT_PLUGINS, collect, get_plugin_manager
from dpo.plugins.losses.cpo import CPOLoss, cpo_loss
from dpo.plugins.losses.orpo import ORPOLoss, log1mexp, log_odds, orpo_loss
from dpo.plugins.losses.sft import SFTLoss, sft_loss
from dpo.plugins.losses.simpo import SimPOLoss, simpo_loss

LN2 = 0.6931471805599453
MODULES = ("dpo.plugins.losses.simpo", "dpo.plugins.losses.orpo", "dpo.plugins.losses.sft",
           "dpo.plugins.losses.cpo")


def pairs(chosen: list[float], rejected: list[float], chosen_tokens: list[int],
          rejected_tokens: list[int], dtype: torch.dtype = torch.float64) -> PairLogps:
    """Policy-only PairLogps (no reference); the policy tensors require grad."""
    return PairLogps(
        policy_chosen=torch.tensor(chosen, dtype=dtype, requires_grad=True),
        policy_rejected=torch.tensor(rejected, dtype=dtype, requires_grad=True),
        chosen_tokens=torch.tensor(chosen_tokens), rejected_tokens=torch.tensor(rejected_tokens))


# -- SimPO ------------------------------------------------------------------------------------

def test_simpo_at_equal_per_token_log_probs_is_softplus_gamma():
    """l_w/n_w = -6/3 = -2 and l_l/n_l = -10/5 = -2: the rewards cancel, z = -gamma, and
    loss = -log sigma(-gamma) = log(1 + e^gamma). gamma = 0.5: log(1 + 1.6487212707001282)
    = 0.9740769841801067; gamma = 0: log 2. Rewards beta * (-2) = -4 on both sides (beta 2),
    so the margin is 0 and the pair counts as wrong (strict >)."""
    logps = pairs([-6.0], [-10.0], [3], [5])
    out = SimPOLoss()(logps)
    assert out.losses.item() == pytest.approx(0.9740769841801067, abs=1e-12)
    assert out.chosen_rewards.tolist() == [-4.0] and out.rejected_rewards.tolist() == [-4.0]
    assert SimPOLoss(gamma=0.0)(logps).losses.item() == pytest.approx(LN2, abs=1e-12)


def test_simpo_at_a_known_point_normalises_by_length():
    """beta = 2, gamma = 0.5; l_w = -2 over 4 tokens (-0.5 a token), l_l = -6 over 4 (-1.5).
    z = 2(-0.5) - 2(-1.5) - 0.5 = -1 + 3 - 0.5 = 1.5;
    loss = log(1 + e^-1.5) = log(1 + 0.22313016014842982) = 0.20141327798275246.
    The same sums over other counts give another value: l_l = -6 over 12 tokens is -0.5 a
    token, so z = -1 + 1 - 0.5 = -0.5 and loss = log(1 + e^0.5) = 0.9740769841801067."""
    out = SimPOLoss(beta=2.0, gamma=0.5)(pairs([-2.0, -2.0], [-6.0, -6.0], [4, 4], [4, 12]))
    assert out.losses.tolist() == pytest.approx([0.20141327798275246, 0.9740769841801067],
                                                abs=1e-12)
    assert out.chosen_rewards.tolist() == [-1.0, -1.0]
    assert out.rejected_rewards.tolist() == [-3.0, -1.0]
    assert simpo_loss(torch.tensor([-0.5], dtype=torch.float64),
                      torch.tensor([-1.5], dtype=torch.float64), 2.0, 0.5).item() == pytest.approx(
        0.20141327798275246, abs=1e-12)


def test_simpo_gradient_signs():
    """dL/dl_w = -(beta/n_w) sigma(-z) < 0, dL/dl_l = +(beta/n_l) sigma(-z) > 0. At the known
    point (z = 1.5, n = 4, beta = 2): sigma(-1.5) = 1/(1 + 4.4816890703380645)
    = 0.18242552380635635, times 2/4: -0.09121276190317817 and +0.09121276190317817."""
    logps = pairs([-2.0], [-6.0], [4], [4])
    SimPOLoss()(logps).loss.backward()
    assert logps.policy_chosen.grad.item() == pytest.approx(-0.09121276190317817, abs=1e-12)
    assert logps.policy_rejected.grad.item() == pytest.approx(0.09121276190317817, abs=1e-12)


# -- ORPO -------------------------------------------------------------------------------------

def test_orpo_at_equal_per_token_probabilities_is_nll_plus_lambda_ln2():
    """l_w = -2 ln 2 over 2 tokens and l_l = -3 ln 2 over 3: both per-token means are -ln 2
    (P = 1/2, odds 1, log odds 0). The log odds ratio is 0, log sigma(0) = -ln 2, so
    loss = NLL - lambda(-ln 2) = ln 2 + 0.1 ln 2 = 1.1 ln 2 = 0.7624618986159398.
    Parts: nll_loss ln 2, log_odds_ratio -ln 2, log_odds_chosen 0. Rewards 0.1 * (-ln 2)."""
    out = ORPOLoss()(pairs([-2 * LN2], [-3 * LN2], [2], [3]))
    assert out.losses.item() == pytest.approx(0.7624618986159398, abs=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(LN2, abs=1e-12)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(-LN2, abs=1e-12)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(0.0, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-0.1 * LN2, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.1 * LN2, abs=1e-12)


def test_orpo_at_a_known_point():
    """Chosen: one token of probability 0.8 (l_w = ln 0.8), odds 0.8/0.2 = 4. Rejected: two
    tokens of 0.5 (l_l = 2 ln 0.5, per token ln 0.5), odds 1. Log odds ratio ln 4 - 0 = ln 4;
    log sigma(ln 4) = log(4/5) = ln 0.8 = -0.2231435513142097; NLL = -ln 0.8.
    loss = -ln 0.8 - 0.1 ln 0.8 = 1.1 * 0.2231435513142097 = 0.2454579064456307.
    Rewards: 0.1 ln 0.8 = -0.02231435513142097 and 0.1 ln 0.5 = -0.06931471805599453."""
    out = ORPOLoss(beta=0.1)(pairs([math.log(0.8)], [2 * math.log(0.5)], [1], [2]))
    assert out.losses.item() == pytest.approx(0.2454579064456307, abs=1e-12)
    assert out.metrics["log_odds_chosen"].item() == pytest.approx(math.log(4.0), abs=1e-12)
    assert out.metrics["log_odds_ratio"].item() == pytest.approx(math.log(0.8), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-0.02231435513142097, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.06931471805599453, abs=1e-12)
    losses, _ = orpo_loss(torch.tensor([math.log(0.8)], dtype=torch.float64),
                          torch.tensor([math.log(0.5)], dtype=torch.float64), 0.1)
    assert losses.item() == pytest.approx(0.2454579064456307, abs=1e-12)


def test_orpo_gradient_signs():
    """At the known point: d log odds / d m = 1 + P/(1-P) = 1/(1-P) for a per-token mean m;
    5 for the chosen (P = 0.8), 2 for the rejected (P = 0.5). With R the log odds ratio,
    d(-lambda log sigma(R))/dR = -lambda sigma(-R) = -0.1 * 1/(1+4) = -0.02.
    Chosen: dL/dm_w = -1 (the NLL) + (-0.02)(5) = -1.1; n_w = 1, so dL/dl_w = -1.1 < 0.
    Rejected: dL/dm_l = (-0.02)(-2) = +0.04; n_l = 2, so dL/dl_l = 0.02 > 0."""
    logps = pairs([math.log(0.8)], [2 * math.log(0.5)], [1], [2])
    ORPOLoss(beta=0.1)(logps).loss.backward()
    assert logps.policy_chosen.grad.item() == pytest.approx(-1.1, abs=1e-12)
    assert logps.policy_rejected.grad.item() == pytest.approx(0.02, abs=1e-12)


def test_log_odds_is_accurate_as_the_probability_goes_to_one():
    """m = l/n -> 0-: 1 - e^m -> -m, so log odds = m - log(1 - e^m) -> -log(-m).
    float64, m = -1e-12: 27.631021115928547 (= -ln 1e-12), to ~1e-12.
    float32, m = -1e-7: -ln 1e-7 = 16.11809565095832 (m itself adds -1e-7); the naive
    log(1 - exp(m)) rounds e^m to 1 - 2^-23 and gives about 15.94 instead.
    m = 0 exactly (P = 1, infinite odds): taken as the largest float below 0, float32's
    smallest normal 2^-126, so log odds = 126 ln 2 = 87.3365447505531 - finite, and the loss and
    its gradient are finite too."""
    assert log_odds(torch.tensor([-1e-12], dtype=torch.float64)).item() == pytest.approx(
        27.631021115928547, abs=1e-9)
    m32 = torch.tensor([-1e-7], dtype=torch.float32)
    assert log_odds(m32).item() == pytest.approx(16.11809565095832, rel=1e-6)
    naive = (m32 - torch.log(1 - torch.exp(m32))).item()
    assert abs(naive - 16.11809565095832) > 0.1  # why the stable form is needed
    assert log_odds(torch.tensor([0.0])).item() == pytest.approx(87.3365447505531, rel=1e-6)
    logps = pairs([0.0, -1e-7], [-3.0, -1e-7], [3, 1], [3, 1], dtype=torch.float32)
    out = ORPOLoss()(logps)
    out.loss.backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(logps.policy_chosen.grad).all()
    assert torch.isfinite(logps.policy_rejected.grad).all()


def test_log_odds_as_the_probability_goes_to_zero():
    """m -> -inf: e^m underflows, log(1 - e^m) -> 0, so log odds -> m. float32, m = -1e4:
    exactly -1e4. The loss of a chosen side at m = -1e4 against a rejected at m = -1:
    NLL = 1e4, and log odds(-1) = -1 - log(1 - e^-1) = -1 - log(0.6321205588285577)
    = -0.5413248546129181; R = -1e4 + 0.5413... ; -log sigma(R) = -R + log(1 + e^R) = -R up to
    e^-9999 (float32 rounds 9999.4587 to a multiple of 2^-10). loss = 1e4 + 0.1 * 9999.4587
    = 10999.9458675."""
    assert log_odds(torch.tensor([-1e4])).item() == -1e4
    assert log_odds(torch.tensor([-1.0], dtype=torch.float64)).item() == pytest.approx(
        -0.5413248546129181, abs=1e-12)
    out = ORPOLoss(beta=0.1)(pairs([-1e4], [-1.0], [1], [1], dtype=torch.float32))
    assert out.losses.item() == pytest.approx(10999.9458675, rel=1e-6)


def test_log1mexp_branches_meet_at_minus_ln2():
    """Both forms equal log(1/2) = -ln 2 at x = -ln 2; either side of it each matches
    log(1 - e^x) computed in float64: x = -3: log(1 - 0.049787068367863944)
    = -0.051069528...; x = -0.1: log(1 - 0.9048374180359595) = log(0.09516258196404048)
    = -2.352168..."""
    x = torch.tensor([-LN2, -3.0, -0.1], dtype=torch.float64)
    expected = [-LN2, math.log(1 - math.exp(-3.0)), math.log(1 - math.exp(-0.1))]
    assert log1mexp(x).tolist() == pytest.approx(expected, abs=1e-14)


# -- SFT on pairs -----------------------------------------------------------------------------

def test_sft_is_the_chosen_per_token_nll_and_ignores_the_rejected():
    """l_w = -6 over 4 tokens: loss = 6/4 = 1.5; a second pair with equal per-token
    log-probs on both sides (-1 a token) gives 1.0 whatever the rejected side holds.
    Rewards are the per-token means themselves (beta 1): -1.5 and -9/3 = -3; -1 and -1.
    dL/dl_w = -1/n_w / B (the mean over B = 2 pairs): -1/8 and -1/4; dL/dl_l = 0."""
    logps = pairs([-6.0, -2.0], [-9.0, -5.0], [4, 2], [3, 5])
    out = SFTLoss()(logps)
    assert out.losses.tolist() == [1.5, 1.0]
    assert out.chosen_rewards.tolist() == [-1.5, -1.0]
    assert out.rejected_rewards.tolist() == [-3.0, -1.0]
    out.loss.backward()
    assert logps.policy_chosen.grad.tolist() == [-0.125, -0.25]
    assert logps.policy_rejected.grad is None or logps.policy_rejected.grad.tolist() == [0, 0]
    assert sft_loss(torch.tensor([-1.5])).tolist() == [1.5]


# -- CPO --------------------------------------------------------------------------------------

def test_cpo_at_equal_summed_log_probs_is_ln2_plus_the_nll():
    """l_w = l_l = -6 (the chosen over 4 tokens): the preference term is -log sigma(0) = ln 2
    whatever beta; the NLL is 6/4 = 1.5. alpha = 1: 0.6931471805599453 + 1.5 =
    2.1931471805599454; alpha = 0.5: ln 2 + 0.75 = 1.4431471805599454; alpha = 0: ln 2.
    Rewards are beta * l = 0.1 * -6 = -0.6 on both sides (summed log-probs, no reference)."""
    logps = pairs([-6.0], [-6.0], [4], [2])
    out = CPOLoss()(logps)
    assert out.losses.item() == pytest.approx(2.1931471805599454, abs=1e-12)
    assert out.metrics["cpo_loss"].item() == pytest.approx(LN2, abs=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(1.5, abs=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([-0.6]) == out.rejected_rewards.tolist()
    assert CPOLoss(alpha=0.5)(logps).losses.item() == pytest.approx(1.4431471805599454, abs=1e-12)
    assert CPOLoss(alpha=0.0)(logps).losses.item() == pytest.approx(LN2, abs=1e-12)


def test_cpo_at_a_known_point_and_its_gradient():
    """beta = 0.5, alpha = 1; l_w = -2 over 2 tokens, l_l = -4.
    z = 0.5 (-2 - (-4)) = 1; preference = log(1 + e^-1) = 0.31326168751822286;
    NLL = 2/2 = 1; loss = 1.3132616875182228.
    dL/dl_w = -beta sigma(-z) - alpha/n_w = -0.5 * 0.2689414213699951 - 0.5
            = -0.6344707106849976 (pushed up); dL/dl_l = +beta sigma(-z) = 0.13447071068499755
    (pushed down). With one pair the batch mean is the pair's loss."""
    logps = pairs([-2.0], [-4.0], [2], [3])
    out = CPOLoss(beta=0.5, alpha=1.0)(logps)
    assert out.losses.item() == pytest.approx(1.3132616875182228, abs=1e-12)
    out.loss.backward()
    assert logps.policy_chosen.grad.item() == pytest.approx(-0.6344707106849976, abs=1e-12)
    assert logps.policy_rejected.grad.item() == pytest.approx(0.13447071068499755, abs=1e-12)
    losses, prefer, nll = cpo_loss(torch.tensor([-2.0], dtype=torch.float64),
                                   torch.tensor([-4.0], dtype=torch.float64),
                                   torch.tensor([-1.0], dtype=torch.float64), 0.5, 1.0)
    assert (losses.item(), prefer.item(), nll.item()) == pytest.approx(
        (1.3132616875182228, 0.31326168751822286, 1.0), abs=1e-12)


# -- all four ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [SimPOLoss, ORPOLoss, SFTLoss, CPOLoss],
                         ids=["simpo", "orpo", "sft", "cpo"])
def test_reference_free_losses_ignore_a_reference_and_keep_the_graph(cls):
    """No reference needed; one given changes nothing (the loss never reads it). Only the
    losses carry the graph."""
    assert cls.requires_reference is False
    free = cls()(pairs([-3.0, -1.0], [-4.0, -2.0], [2, 3], [4, 1]))
    given = pairs([-3.0, -1.0], [-4.0, -2.0], [2, 3], [4, 1])
    given.ref_chosen = torch.tensor([-9.0, -9.0], dtype=torch.float64)
    given.ref_rejected = torch.tensor([0.0, 0.0], dtype=torch.float64)
    with_ref = cls()(given)
    assert free.losses.tolist() == with_ref.losses.tolist()
    assert free.chosen_rewards.tolist() == with_ref.chosen_rewards.tolist()
    assert free.losses.requires_grad
    assert not free.chosen_rewards.requires_grad and not free.rejected_rewards.requires_grad


def test_options_defaults_and_bad_values():
    """Defaults: SimPO beta 2.0 and gamma 0.5 (the paper's), ORPO beta (lambda) 0.1 (TRL's),
    SFT none. A negative margin, a non-positive beta or any SFT option is one line."""
    assert SimPOLoss().options.model_dump() == {"beta": 2.0, "gamma": 0.5}
    assert ORPOLoss().options.model_dump() == {"beta": 0.1}
    assert SFTLoss().options.model_dump() == {}
    assert CPOLoss().options.model_dump() == {"beta": 0.1, "alpha": 1.0}
    assert SimPOLoss.parse_options({"gamma": "1.25", "beta": "2.5"}).gamma == 1.25
    for cls, values, key in [(SimPOLoss, {"gamma": "-0.1"}, "gamma"),
                             (SimPOLoss, {"beta": "0"}, "beta"),
                             (ORPOLoss, {"beta": "-1"}, "beta"),
                             (SFTLoss, {"beta": "1"}, "beta")]:
        with pytest.raises(UsageError) as info:
            cls.parse_options(values)
        assert "\n" not in str(info.value) and key in str(info.value)
        assert cls.name in str(info.value)


def test_built_in_modules_register_the_reference_free_losses():
    for module in MODULES:
        assert module in DEFAULT_PLUGINS
    pm = get_plugin_manager(load_entrypoints=False, defaults=MODULES)
    catalog = collect(pm)
    assert not pm.failures
    assert catalog.losses.get("simpo") is SimPOLoss
    assert catalog.losses.get("orpo") is ORPOLoss
    assert catalog.losses.get("sft") is SFTLoss
    assert catalog.losses.get("cpo") is CPOLoss
    for module, name in zip(MODULES, ("simpo", "orpo", "sft", "cpo")):
        assert catalog.registrations[module]["dpo_register_losses"] == [name]
