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
        assert not row["status"].startswith("DIFFERS"), row
        by_status.setdefault(row["status"].split(":")[0], []).append(row["loss"])
    assert {"dpo", "cdpo", "ipo", "sft", "simpo", "orpo", "kto"} <= set(by_status["agrees"])
    assert "ipo" in by_status["differs on purpose"]  # length_normalize=false
    kto = [row for row in result["rows"] if row["loss"] == "kto"]
    assert len(kto) == 2 and kto[1]["options"]["desirable_weight"] != 1.0


def test_kto_batches_hold_the_edge_cases():
    """The unpaired inputs: every example in a micro-batch of at least two (a KL estimate
    needs another example's completion), and the first batches are policy == reference, all
    desirable, all undesirable, and a negative KL estimate."""
    script = load_script()
    batches = script.random_batches(64, 0)
    assert sum(len(b) for b in batches) == 64 and min(len(b) for b in batches) >= 2
    assert all(e["policy"] == e["reference"] and e["policy_kl"] == e["reference_kl"]
               for e in batches[0])
    assert all(e["label"] for e in batches[1]) and not any(e["label"] for e in batches[2])
    assert sum(e["policy_kl"] - e["reference_kl"] for e in batches[3]) < 0
