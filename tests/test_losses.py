"""Golden tests of the DPO-family and IPO losses. Every expected value is derived by hand in the
test's docstring; none was copied from running the code."""

from __future__ import annotations

import math

import pytest
import torch

from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.loss import PairLogps
from dpo.core.interfaces.plugins import collect, get_plugin_manager
from dpo.plugins.losses.dpo import ConservativeDPOLoss, DPOLoss, cdpo_loss, dpo_loss
from dpo.plugins.losses.ipo import IPOLoss, ipo_loss

LN2 = 0.6931471805599453
OUR_MODULES = ("dpo.plugins.losses.dpo", "dpo.plugins.losses.ipo", "dpo.plugins.stopping.nan_guard")


def pairs(policy_chosen: list[float], ref_chosen: list[float] | None, policy_rejected: list[float],
          ref_rejected: list[float] | None, chosen_tokens: list[int] | None = None,
          rejected_tokens: list[int] | None = None, dtype: torch.dtype = torch.float64,
          ) -> PairLogps:
    """PairLogps from plain lists; the policy tensors require grad."""
    n = len(policy_chosen)

    def t(values: list[float] | None, grad: bool = False) -> torch.Tensor | None:
        return None if values is None else torch.tensor(values, dtype=dtype, requires_grad=grad)

    return PairLogps(
        policy_chosen=t(policy_chosen, True), policy_rejected=t(policy_rejected, True),
        chosen_tokens=torch.tensor(chosen_tokens or [1] * n),
        rejected_tokens=torch.tensor(rejected_tokens or [1] * n),
        ref_chosen=t(ref_chosen), ref_rejected=t(ref_rejected),
    )


@pytest.mark.parametrize("loss", [DPOLoss(), ConservativeDPOLoss(eps=0.2)], ids=["dpo", "cdpo"])
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(loss):
    """Policy == reference: r_w = r_l = 0, so h = 0 and beta h = 0, sigma(0) = 1/2.
    DPO: -log(1/2) = ln 2 = 0.693147...
    cDPO: -(1-eps) log(1/2) - eps log(1/2) = ((1-eps) + eps) ln 2 = ln 2.
    Rewards beta * 0 = 0, margins 0 - 0 = 0."""
    out = loss(pairs([-3.0, -7.5], [-3.0, -7.5], [-4.0, -2.25], [-4.0, -2.25]))
    assert out.losses.tolist() == pytest.approx([LN2, LN2], abs=1e-12)
    assert out.loss.item() == pytest.approx(LN2, abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.0, 0.0]
    assert out.rejected_rewards.tolist() == [0.0, 0.0]
    assert (out.chosen_rewards - out.rejected_rewards).tolist() == [0.0, 0.0]


def test_dpo_value_at_nonzero_margin():
    """beta = 0.5; r_w = -1 - (-2) = 1, r_l = -3 - (-2) = -1, so h = 2 and beta h = 1.
    loss = -log sigma(1) = log(1 + e^-1) = log(1 + 0.36787944117144233)
         = log(1.3678794411714423) = 0.31326168751822286.
    Rewards: 0.5 * 1 = 0.5 and 0.5 * (-1) = -0.5."""
    out = DPOLoss(beta=0.5)(pairs([-1.0], [-2.0], [-3.0], [-2.0]))
    assert out.losses.item() == pytest.approx(0.31326168751822286, abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.5]
    assert out.rejected_rewards.tolist() == [-0.5]
    assert dpo_loss(torch.tensor([2.0], dtype=torch.float64), 0.5).item() == pytest.approx(
        0.31326168751822286, abs=1e-12)


def test_cdpo_with_small_eps():
    """beta = 0.5, h = 2 (as above), so z = beta h = 1, eps = 0.01.
    Using -log sigma(-z) = softplus(z) = z + softplus(-z):
    loss = (1-eps) softplus(-z) + eps (z + softplus(-z)) = softplus(-z) + eps z
         = 0.31326168751822286 + 0.01 * 1 = 0.32326168751822286."""
    out = ConservativeDPOLoss(beta=0.5, eps=0.01)(pairs([-1.0], [-2.0], [-3.0], [-2.0]))
    assert out.losses.item() == pytest.approx(0.32326168751822286, abs=1e-12)
    assert out.chosen_rewards.tolist() == [0.5]
    assert out.rejected_rewards.tolist() == [-0.5]


def test_cdpo_gradient_vanishes_where_sigma_is_one_minus_eps():
    """dL/dh = beta [-(1-eps)(1 - sigma(z)) + eps sigma(z)] = beta [sigma(z) - (1-eps)], z = beta h.
    With beta = 0.5, eps = 0.2: zero at sigma(z) = 0.8, z = logit(0.8) = ln(0.8/0.2) = ln 4,
    h = ln 4 / 0.5 = 2 ln 4 = 2.772588722239781.
    At h = 0 instead: 0.5 * (0.5 - 0.8) = -0.15 (not zero: the check does see gradients)."""
    loss = ConservativeDPOLoss(beta=0.5, eps=0.2)
    h = 2 * math.log(4.0)
    logps = pairs([h, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    loss(logps).losses.sum().backward()
    grad = logps.policy_chosen.grad.tolist()
    assert grad[0] == pytest.approx(0.0, abs=1e-12)
    assert grad[1] == pytest.approx(-0.15, abs=1e-12)

    h_direct = torch.tensor([h], dtype=torch.float64, requires_grad=True)
    cdpo_loss(h_direct, 0.5, 0.2).sum().backward()
    assert h_direct.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_dpo_gradient_sign():
    """dL/dl_w = -beta (1 - sigma(beta h)) < 0: raising the chosen log-prob lowers the loss;
    dL/dl_l = +beta (1 - sigma(beta h)) > 0. At h = 0, beta = 0.1: -0.1 * 0.5 = -0.05 and +0.05."""
    logps = pairs([-5.0], [-5.0], [-6.0], [-6.0])
    DPOLoss(beta=0.1)(logps).loss.backward()
    assert logps.policy_chosen.grad.item() == pytest.approx(-0.05, abs=1e-12)
    assert logps.policy_rejected.grad.item() == pytest.approx(0.05, abs=1e-12)


def test_losses_keep_the_graph_and_rewards_are_detached():
    """Only ``losses`` may carry the graph: rewards are logged, never backpropagated."""
    for loss in (DPOLoss(), ConservativeDPOLoss(), IPOLoss()):
        out = loss(pairs([-1.0, -2.0], [-1.5, -2.0], [-3.0, -1.0], [-2.5, -1.0], [2, 3], [4, 1]))
        assert out.losses.shape == (2,)
        assert out.losses.requires_grad
        assert not out.chosen_rewards.requires_grad
        assert not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("loss", [DPOLoss(beta=1.0), ConservativeDPOLoss(beta=1.0, eps=0.1)],
                         ids=["dpo", "cdpo"])
def test_numerically_stable_at_huge_margins(loss):
    """float32, beta = 1, h = +/-1e4 (r_w = +/-1e4, r_l = 0), so z = beta h = +/-1e4.
    log(sigmoid(-1e4)) would be log(0) = -inf; the softplus form stays finite:
    DPO: softplus(-z) -> z = 1e4: e^-1e4 underflows, loss = 0; z = -1e4: loss = 1e4 = beta|h|.
    cDPO: softplus(-z) + eps z -> z = 1e4: 0 + 0.1 * 1e4 = 1000;
          z = -1e4: 1e4 + 0.1 * (-1e4) = 9000.
    Gradients (beta [sigma(z) - 1] for DPO) are finite too."""
    expected = {"dpo": [0.0, 1e4], "cdpo": [1000.0, 9000.0]}[loss.name]
    logps = pairs([1e4, -1e4], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], dtype=torch.float32)
    out = loss(logps)
    assert torch.isfinite(out.losses).all()
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    out.losses.sum().backward()
    assert torch.isfinite(logps.policy_chosen.grad).all()


@pytest.mark.parametrize("length_normalize", [True, False])
def test_ipo_is_zero_at_the_target_margin(length_normalize):
    """beta = 0.25, so the target margin is 1/(2 * 0.25) = 2.
    Summed: r_w = -4 - (-5) = 1, r_l = -6 - (-5) = -1, h = 1 - (-1) = 2, loss (2 - 2)^2 = 0.
    Normalised: r_w = -1 - (-5) = 4 over n_w = 2 tokens -> 2; r_l = -5 - (-5) = 0 over
    n_l = 3 -> 0; h = 2 - 0 = 2, loss 0. Each case is exact in binary floating point."""
    if length_normalize:
        logps = pairs([-1.0], [-5.0], [-5.0], [-5.0], [2], [3])
    else:
        logps = pairs([-4.0], [-5.0], [-6.0], [-5.0], [2], [3])
    out = IPOLoss(beta=0.25, length_normalize=length_normalize)(logps)
    assert out.losses.tolist() == [0.0]
    assert ipo_loss(torch.tensor([2.0]), 0.25).tolist() == [0.0]


def test_ipo_length_normalisation_divides_by_token_counts():
    """beta = 0.5, target 1/(2 * 0.5) = 1. r_w = -4 - (-10) = 6 with n_w = 3, r_l = -9 - (-5) = -4
    with n_l = 4.
    Normalised: h = 6/3 - (-4/4) = 2 + 1 = 3, loss (3 - 1)^2 = 4.
    Summed:     h = 6 - (-4) = 10,          loss (10 - 1)^2 = 81.
    Rewards use the summed ratios in both modes: 0.5 * 6 = 3 and 0.5 * (-4) = -2."""
    for length_normalize, expected in ((True, 4.0), (False, 81.0)):
        logps = pairs([-4.0], [-10.0], [-9.0], [-5.0], [3], [4])
        out = IPOLoss(beta=0.5, length_normalize=length_normalize)(logps)
        assert out.losses.tolist() == [expected]
        assert out.chosen_rewards.tolist() == [3.0]
        assert out.rejected_rewards.tolist() == [-2.0]


def test_default_options():
    assert DPOLoss().options.beta == 0.1
    assert ConservativeDPOLoss().options.beta == 0.1
    assert ConservativeDPOLoss().options.eps == 0.1
    assert IPOLoss().options.beta == 0.1
    assert IPOLoss().options.length_normalize is True
    assert all(cls.requires_reference for cls in (DPOLoss, ConservativeDPOLoss, IPOLoss))
    assert all(description for cls in (DPOLoss, ConservativeDPOLoss, IPOLoss)
               for _, _, _, description in cls.describe_options())


def test_options_parse_strings_from_the_command_line():
    options = IPOLoss.parse_options({"beta": "0.2", "length_normalize": "false"})
    assert options.beta == 0.2
    assert options.length_normalize is False
    assert ConservativeDPOLoss.parse_options({"eps": "0.25"}).eps == 0.25


@pytest.mark.parametrize("cls, values, key", [
    (IPOLoss, {"gamma": "1"}, "gamma"),
    (DPOLoss, {"eps": "0.1"}, "eps"),
    (ConservativeDPOLoss, {"eps": "0.7"}, "eps"),
    (ConservativeDPOLoss, {"eps": "0.5"}, "eps"),
    (ConservativeDPOLoss, {"eps": "0"}, "eps"),
    (DPOLoss, {"beta": "-1"}, "beta"),
    (IPOLoss, {"beta": "0"}, "beta"),
    (DPOLoss, {"beta": "inf"}, "beta"),
    (IPOLoss, {"length_normalize": "maybe"}, "length_normalize"),
])
def test_bad_options_are_refused_in_one_line(cls, values, key):
    with pytest.raises(UsageError) as info:
        cls.parse_options(values)
    message = str(info.value)
    assert "\n" not in message
    assert key in message
    assert cls.name in message


@pytest.mark.parametrize("loss", [DPOLoss(), ConservativeDPOLoss(), IPOLoss()],
                         ids=["dpo", "cdpo", "ipo"])
def test_missing_reference_is_a_clear_error(loss):
    with pytest.raises(ValueError, match=f"loss '{loss.name}' needs reference log-probs"):
        loss(pairs([-1.0], None, [-2.0], None))


def test_modules_register_their_losses():
    pm = get_plugin_manager(load_entrypoints=False, defaults=OUR_MODULES)
    catalog = collect(pm)
    assert not pm.failures
    assert {"dpo", "cdpo", "ipo"} <= set(catalog.losses.names())
    assert catalog.registrations["dpo.plugins.losses.dpo"]["dpo_register_losses"] == [
        "dpo", "cdpo", "robust"]
    assert catalog.registrations["dpo.plugins.losses.ipo"]["dpo_register_losses"] == ["ipo"]
    assert catalog.losses.get("dpo") is DPOLoss
    assert catalog.losses.get("cdpo") is ConservativeDPOLoss
    assert catalog.losses.get("ipo") is IPOLoss
