"""``dpo eval``: the same numbers a run logs, from the outside."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.interfaces.plugins import get_plugin_manager


@pytest.fixture
def app():
    return make_app(get_plugin_manager(load_entrypoints=False))


def write_pairs(path, n=12):
    path.write_text("".join(json.dumps({"prompt": f"{i} plus 2 is ", "chosen": f"{i + 2}.",
                                        "rejected": f"{i + 3}."}) + "\n" for i in range(n)))
    return str(path)


def test_eval_of_a_run_matches_its_final_evaluation(tmp_path, app):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    trained = CliRunner().invoke(app, [
        "run", "--no-progress", "--model", "tiny", "--data", data, "--eval-data", data,
        "--backend", "cpu", "--max-steps", "6", "--lr", "3e-3", "-o", "beta=0.5",
        "--output", str(out)])
    assert trained.exit_code == 0, trained.output
    final_eval = json.loads((out / "run.json").read_text())["final_eval"]

    # The run directory supplies the reference (tiny, seed 42), the loss and beta = 0.5.
    result = CliRunner().invoke(app, ["eval", "--model", str(out), "--data", data, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ref"] == "tiny" and report["options"]["beta"] == 0.5 and report["pairs"] == 12
    for key, value in final_eval.items():
        assert report["metrics"][key.removeprefix("eval/")] == pytest.approx(value, abs=1e-5), key

    table = CliRunner().invoke(app, ["eval", "--model", str(out / "final"), "--ref", "tiny",
                                     "--data", data])
    assert table.exit_code == 0 and "rewards/accuracies" in table.output


def test_policy_equal_to_reference_scores_ln2(tmp_path, app):
    """tiny against tiny (same seed): every reward is 0, the DPO loss -log sigma(0) = ln 2 and
    no pair counts as correctly ranked."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--ref", "tiny", "--data", data,
                                      "--backend", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)["metrics"]
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/accuracies"] == 0.0 and metrics["rewards/margins"] == 0.0


def test_eval_errors_are_one_line(tmp_path, app):
    data = write_pairs(tmp_path / "pairs.jsonl")
    no_ref = CliRunner().invoke(app, ["eval", "--model", "tiny", "--data", data])
    assert no_ref.exit_code == 2 and "give --ref" in no_ref.output
    missing = CliRunner().invoke(app, ["eval", "--model", "tiny", "--ref", "tiny",
                                       "--data", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "none.jsonl" in missing.output
    bad_loss = CliRunner().invoke(app, ["eval", "--model", "tiny", "--ref", "tiny", "--data", data,
                                        "--loss", "nope"])
    assert bad_loss.exit_code == 2 and "unknown loss 'nope'; installed:" in bad_loss.output
    for result in (no_ref, missing, bad_loss):
        assert "Traceback" not in result.output
