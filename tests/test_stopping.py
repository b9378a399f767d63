"""The early-stopping and target stopping policies: decisions, state, and whole runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.interfaces.errors import DpoError, UsageError
from dpo.core.interfaces.plugins import DEFAULT_PLUGINS, collect, get_plugin_manager
from dpo.core.model.tiny import build_tiny_model, build_tiny_tokenizer
from dpo.plugins.stopping.early_stopping import EarlyStopping
from dpo.plugins.stopping.target import Target
from dpo.testing import write_arithmetic_pairs as write_pairs

ACC = "eval/rewards/accuracies"


def feed(policy, values, metric=ACC):
    """Decisions for evaluations at steps 10, 20, ... with the given metric values."""
    return [policy.on_eval(10 * (i + 1), {metric: v}) for i, v in enumerate(values)]


def test_both_are_default_plugins():
    catalog = collect(get_plugin_manager(load_entrypoints=False))
    assert "dpo.plugins.stopping.early_stopping" in DEFAULT_PLUGINS
    assert catalog.stopping.get("early-stopping") is EarlyStopping
    assert catalog.stopping.get("target") is Target


def test_early_stopping_counts_evaluations_without_improvement():
    """patience 2, min_delta 0.05, mode max. Values 0.5 (best), 0.6 (+0.1: best), 0.62 (+0.02 is
    not more than 0.05: bad 1), 0.7 (+0.1 over 0.6: best, count reset), 0.7 (bad 1), 0.74
    (+0.04: bad 2 -> stop, naming the best 0.7 at step 40)."""
    policy = EarlyStopping(patience=2, min_delta=0.05)
    decisions = feed(policy, [0.5, 0.6, 0.62, 0.7, 0.7, 0.74])
    assert [d.best for d in decisions] == [True, True, False, True, False, False]
    assert [d.stop for d in decisions] == [False] * 5 + [True]
    assert "0.7 (step 40)" in decisions[-1].reason and "2 evaluations" in decisions[-1].reason
    assert (policy.best, policy.best_step) == (0.7, 40)


def test_early_stopping_min_mode_and_nan_never_improves():
    """mode min on eval/loss, patience 1: 0.69 (best), nan (not an improvement -> stop)."""
    policy = EarlyStopping(metric="eval/loss", mode="min", patience=1)
    decisions = feed(policy, [0.69, float("nan")], metric="eval/loss")
    assert decisions[0].best and decisions[1].stop


def test_early_stopping_on_a_training_metric_watches_steps():
    policy = EarlyStopping(metric="loss", mode="min", patience=1)
    assert not policy.on_eval(1, {ACC: 1.0}).stop  # evaluations are ignored then
    assert policy.on_step(1, {"loss": 0.6}).best
    assert policy.on_step(2, {"loss": 0.7}).stop


def test_early_stopping_state_round_trip_decides_like_an_uninterrupted_policy():
    values = [0.5, 0.6, 0.55, 0.58, 0.57]
    straight = EarlyStopping(patience=3)
    expected = feed(straight, values)
    first = EarlyStopping(patience=3)
    feed(first, values[:3])
    state = json.loads(json.dumps(first.state_dict()))  # it is saved as JSON in checkpoints
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(state)
    rest = [resumed.on_eval(10 * (i + 4), {ACC: v}) for i, v in enumerate(values[3:])]
    assert rest == expected[3:] and rest[-1].stop


def test_target_stops_when_the_threshold_is_reached():
    policy = Target(threshold=0.75)
    assert [d.stop for d in feed(policy, [0.5, 0.74, 0.75])] == [False, False, True]
    low = Target(metric="eval/loss", threshold=0.3, mode="min")
    assert [d.stop for d in feed(low, [0.5, 0.3], metric="eval/loss")] == [False, True]


def test_bad_options_and_missing_metrics_are_one_line_errors():
    with pytest.raises(UsageError, match="threshold: Field required"):
        Target.parse_options({})
    with pytest.raises(UsageError, match="option mode=up"):
        EarlyStopping.parse_options({"mode": "up"})
    with pytest.raises(UsageError, match="option patience=0"):
        EarlyStopping.parse_options({"patience": "0"})
    with pytest.raises(DpoError, match="watches 'eval/acc', which this run does not report; "
                                       "reported: eval/loss"):
        EarlyStopping(metric="eval/acc").on_eval(1, {"eval/loss": 0.5})


# -- whole runs --------------------------------------------------------------------------------



@pytest.fixture
def run_cli(tmp_path):
    app = make_app(get_plugin_manager(load_entrypoints=False))
    data = str(write_pairs(tmp_path / "pairs.jsonl"))

    def call(out: str, *args: str):
        return CliRunner().invoke(app, [
            "run", "--no-progress", "--model", "tiny", "--data", data, "--eval-data", data,
            "--backend", "cpu", "--batch-size", "4", "--lr", "3e-3", "-o", "beta=0.5",
            "--output", str(tmp_path / out), *args])

    return call


def evals(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/loss" in r]


def test_early_stopping_run_stops_and_restores_the_best_weights(tmp_path, run_cli):
    """min_delta 10 on eval/loss: nothing can improve on the step-0 baseline by that much, so
    the evaluations at steps 2 and 4 are the 2 without improvement that end the run (patience
    2), and the final weights are restored from step 0: exactly the initial tiny model
    (seed 42), while the step-4 checkpoint has moved away from it."""
    result = run_cli("out", "--max-steps", "20", "--eval-steps", "2", "--stop", "early-stopping",
                     "--stop", "nan-guard", "-o", "early-stopping.metric=eval/loss",
                     "-o", "early-stopping.mode=min", "-o", "early-stopping.patience=2",
                     "-o", "early-stopping.min_delta=10")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert [r["step"] for r in evals(out)] == [0, 2, 4]
    run = json.loads((out / "run.json").read_text())
    assert run["status"].startswith("stopped by early-stopping") and run["steps"] == 4
    assert run["restored_best_from_step"] == 0
    assert run["final_eval"] == {k: v for k, v in evals(out)[0].items() if k != "step"}

    from transformers import AutoModelForCausalLM

    initial = build_tiny_model(build_tiny_tokenizer(), seed=42).state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    moved = AutoModelForCausalLM.from_pretrained(out / "checkpoint-4").state_dict()
    assert all(torch.equal(final[k], initial[k]) for k in initial)
    assert not all(torch.equal(moved[k], initial[k]) for k in initial)


def test_target_and_other_policies_run_together(tmp_path, run_cli):
    result = run_cli("out", "--max-steps", "30", "--eval-steps", "2", "--stop", "target",
                     "--stop", "early-stopping", "--stop", "nan-guard",
                     "-o", "target.threshold=0.6", "-o", "early-stopping.patience=20")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    rows = evals(out)
    run = json.loads((out / "run.json").read_text())
    assert run["status"].startswith("stopped by target")
    # It stopped at the first evaluation that reached 0.6, and not before.
    assert rows[-1]["step"] == run["steps"] < 30 and rows[-1][ACC] >= 0.6
    assert all(r[ACC] < 0.6 for r in rows[:-1])
    # early-stopping (restore_best on) ends the run on its best evaluation's weights.
    assert run["restored_best_from_step"] is not None


def test_eval_policies_need_held_out_data_and_a_reported_metric(tmp_path):
    app = make_app(get_plugin_manager(load_entrypoints=False))
    data = str(write_pairs(tmp_path / "pairs.jsonl"))
    base = ["run", "--no-progress", "--model", "tiny", "--data", data, "--backend", "cpu",
            "--max-steps", "2"]
    no_eval = CliRunner().invoke(app, [*base, "--output", str(tmp_path / "a"),
                                       "--stop", "early-stopping"])
    assert no_eval.exit_code == 2 and "needs held-out pairs" in no_eval.output
    assert not (tmp_path / "a").exists()

    unknown = CliRunner().invoke(app, [*base, "--output", str(tmp_path / "b"), "--eval-data", data,
                                       "--stop", "target", "-o", "target.threshold=1",
                                       "-o", "target.metric=eval/nope"])
    assert unknown.exit_code == 1 and "watches 'eval/nope'" in unknown.output
    assert len(unknown.output.strip().splitlines()[-1]) > 0 and "Traceback" not in unknown.output
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["status"].startswith("failed: stopping policy 'target' watches")
