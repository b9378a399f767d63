"""Tests of the example plugin, written the way a third-party plugin author would."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import dpo
from dpo.cli import make_app
from dpo.core.plugins import collect
from dpo_example_plugin import HingeLoss


def test_installed_plugin_is_discovered_through_the_entry_point(dpo_plugin_manager):
    catalog = collect(dpo_plugin_manager)
    assert catalog.losses.providers["example-hinge"] == "example"
    source = dpo_plugin_manager.sources["example"]
    assert (source.distribution, source.builtin) == ("dpo-example-plugin", False)


def test_hinge_golden_values():
    """beta = 0.5. Pair 1: r_w = -1 - (-2) = 1, r_l = -3 - (-1) = -2, h = 3, beta*h = 1.5 >= 1
    -> loss max(0, 1 - 1.5) = 0. Pair 2: r_w = 0, r_l = 1, h = -1 -> loss 1 - (-0.5) = 1.5.
    Rewards: beta*r_w = 0.5 and 0; beta*r_l = -1 and 0.5."""
    loss = HingeLoss(beta=0.5)
    out = loss(dpo.PairLogps(
        policy_chosen=torch.tensor([-1.0, -4.0]), policy_rejected=torch.tensor([-3.0, -1.0]),
        ref_chosen=torch.tensor([-2.0, -4.0]), ref_rejected=torch.tensor([-1.0, -2.0]),
        chosen_tokens=torch.tensor([3, 3]), rejected_tokens=torch.tensor([3, 3]),
    ))
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-1.0, 0.5]))


def test_bad_option_is_one_line_error():
    with pytest.raises(dpo.UsageError, match="example-hinge.*beta"):
        HingeLoss.parse_options({"beta": "-1"})


def test_dpo_plugins_lists_it_and_its_command(dpo_plugin_manager):
    result = CliRunner().invoke(make_app(dpo_plugin_manager), ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    report = {p["name"]: p for p in json.loads(result.output)["plugins"]}
    assert report["example"]["hooks"] == {
        "dpo_register_losses": ["example-hinge"],
        "dpo_register_commands": ["hinge-table"],
    }


def test_plugin_command_runs(dpo_plugin_manager):
    result = CliRunner().invoke(make_app(dpo_plugin_manager), ["hinge-table", "--beta", "0.1"])
    assert result.exit_code == 0, result.output
    assert "h=20 loss=0" in result.output and "h=0 loss=1" in result.output


def test_a_run_trains_with_the_plugin_loss(dpo_plugin_manager, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 = ", "chosen": f"{i + 1}",
                                        "rejected": f"{i + 2}"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(dpo_plugin_manager), [
        "run", "--no-progress", "--model", "tiny", "--data", str(data), "--backend", "cpu",
        "--loss", "example-hinge", "-o", "beta=0.5", "--max-steps", "3", "--batch-size", "4",
        "--output", str(out)])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Step 1: policy == reference, so h = 0 and the hinge loss is max(0, 1 - 0) = 1.
    assert steps[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["loss"] == "example-hinge" and run["status"] == "completed"
