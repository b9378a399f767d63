"""Our loss plugins against TRL 1.16's own loss code (``benchmarks/trl_losses.py``), run only
where ``DPO_TRL_PYTHON`` names the python of a virtualenv holding TRL (never a dependency of this
project): ``python benchmarks/trl_losses.py --make-venv DIR`` makes one."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "trl_losses.py"
TRL_PYTHON = os.environ.get("DPO_TRL_PYTHON")

pytestmark = pytest.mark.skipif(
    not TRL_PYTHON,
    reason="DPO_TRL_PYTHON is not set (a virtualenv with trl 1.16: python "
           "benchmarks/trl_losses.py --make-venv DIR, then DPO_TRL_PYTHON=DIR/bin/python)")


def load_script():
    spec = importlib.util.spec_from_file_location("trl_losses", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_registered_loss_agrees_with_trl_or_says_why_not():
    """Each loss of the script's table that is registered here either agrees with TRL's value
    on every random pair (float64; ORPO at TRL's float32) or differs for a reason the table
    gives; the ones this branch has are among the compared, not skipped."""
    script = load_script()
    result = script.compare(TRL_PYTHON, n=64, seed=0)
    assert result["trl"].startswith("1.16")
    by_status = {}
    for row in result["rows"]:
        assert row["status"] != "DIFFERS", row
        by_status.setdefault(row["status"].split(":")[0], []).append(row["loss"])
    assert {"dpo", "cdpo", "ipo", "sft", "simpo", "orpo"} <= set(by_status["agrees"])
    assert "ipo" in by_status["differs on purpose"]  # length_normalize=false
