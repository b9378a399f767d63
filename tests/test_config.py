"""RunConfig layering and the learning-rate schedule."""

from __future__ import annotations

import pytest

from dpo.core.config import resolve_config, split_options
from dpo.core.errors import UsageError
from dpo.core.schedule import lr_factor


def test_layers_later_wins_and_options_merge_per_plugin():
    defaults_file = {"lr": 0.1, "max_steps": 5, "options": {"beta": 0.2, "nan-guard": {"check_grad_norm": False}}}
    flags = {"lr": 0.5, "max_steps": None, "options": {"beta": "0.3"}}
    config = resolve_config(defaults_file, flags)
    assert config.lr == 0.5 and config.max_steps == 5 and config.batch_size == 4
    assert config.options == {"dpo": {"beta": "0.3"}, "nan-guard": {"check_grad_norm": False}}


def test_unqualified_options_follow_the_selected_loss():
    assert split_options({"beta": 1, "nan-guard.x": 2}, "ipo") == {"ipo": {"beta": 1}, "nan-guard": {"x": 2}}
    assert resolve_config({"loss": "ipo", "options": {"beta": 1}}).options == {"ipo": {"beta": 1}}


def test_invalid_values_are_usage_errors():
    with pytest.raises(UsageError, match="--batch-size=0"):
        resolve_config({"batch_size": 0})
    with pytest.raises(UsageError, match="either eval_data or eval_fraction"):
        resolve_config({"eval_data": "x.jsonl", "eval_fraction": 0.1})


def test_schedule_by_hand():
    """warmup 2 of 10 steps: factors (s+1)/3 = 1/3, 2/3; then linear from 1 down:
    step 2 -> 1 - 0/8 = 1, step 6 -> 1 - 4/8 = 0.5; cosine at step 6 -> (1 + cos(pi/2))/2 = 0.5,
    at step 4 -> (1 + cos(pi/4))/2 = 0.853553..."""
    assert lr_factor(0, "linear", 2, 10) == pytest.approx(1 / 3)
    assert lr_factor(1, "linear", 2, 10) == pytest.approx(2 / 3)
    assert lr_factor(2, "linear", 2, 10) == 1.0
    assert lr_factor(6, "linear", 2, 10) == 0.5
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5)
    assert lr_factor(4, "cosine", 2, 10) == pytest.approx(0.8535533905932737)
    assert lr_factor(9, "constant", 0, 10) == 1.0
