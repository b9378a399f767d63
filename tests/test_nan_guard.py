"""The nan-guard stopping policy."""

from __future__ import annotations

import math

import pytest

from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.plugins import collect, get_plugin_manager
from dpo.core.interfaces.stopping import CONTINUE
from dpo.plugins.stopping.nan_guard import NanGuard

NAN, INF = math.nan, math.inf


def test_finite_metrics_continue():
    guard = NanGuard()
    assert guard.on_step(3, {"loss": 0.69, "grad_norm": 1.5, "rewards/accuracies": 0.0}) == CONTINUE
    assert guard.on_step(4, {"loss": 0.5}) == CONTINUE  # grad_norm absent: nothing to check
    assert guard.on_eval(4, {"eval/loss": 0.7}) == CONTINUE
    assert guard.on_eval(4, {}) == CONTINUE


def test_nan_loss_stops_without_saving():
    decision = NanGuard().on_step(7, {"loss": NAN, "grad_norm": 1.0})
    assert decision.stop and not decision.save
    assert decision.reason == ("non-finite loss (nan) at step 7: the update was not applied; "
                               "the last good checkpoint is kept")


@pytest.mark.parametrize("value, shown", [(INF, "inf"), (-INF, "-inf"), (NAN, "nan")])
def test_non_finite_grad_norm_stops_without_saving(value, shown):
    decision = NanGuard().on_step(12, {"loss": 0.4, "grad_norm": value})
    assert decision.stop and not decision.save
    assert f"grad_norm ({shown}) at step 12" in decision.reason


def test_grad_norm_ignored_when_not_checked():
    guard = NanGuard(check_grad_norm=False)
    assert guard.on_step(5, {"loss": 0.4, "grad_norm": INF}) == CONTINUE
    assert guard.on_step(5, {"loss": INF, "grad_norm": 1.0}).stop


def test_non_finite_eval_loss_stops_without_saving():
    decision = NanGuard().on_eval(20, {"eval/loss": INF})
    assert decision.stop and not decision.save
    assert "eval/loss (inf) at step 20" in decision.reason
    assert "last good checkpoint is kept" in decision.reason


def test_keeps_no_state():
    guard = NanGuard()
    guard.on_step(1, {"loss": NAN})
    assert guard.state_dict() == {}
    guard.load_state_dict({})


def test_options():
    assert NanGuard().options.check_grad_norm is True
    assert NanGuard.parse_options({"check_grad_norm": "false"}).check_grad_norm is False
    with pytest.raises(UsageError, match="check_grad"):
        NanGuard.parse_options({"check_grad": "false"})


def test_module_registers_nan_guard():
    pm = get_plugin_manager(load_entrypoints=False, defaults=("dpo.plugins.stopping.nan_guard",))
    catalog = collect(pm)
    assert not pm.failures
    assert catalog.stopping.names() == ["nan-guard"]
    assert catalog.stopping.get("nan-guard") is NanGuard
