"""The likelihood-guard, plateau, budget and margin-guard stopping policies: their decisions on
hand-made metric sequences, and whole tiny runs that stop (or pause) for the stated reason and
stop at the same step, with the same metrics, when resumed after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.plugins import DEFAULT_PLUGINS, collect, get_plugin_manager
from dpo.core.interfaces.stopping import RunContext
from dpo.core.training.loop import TIMING_KEYS
from dpo.plugins.stopping.budget import Budget, parse_duration
from dpo.plugins.stopping.likelihood_guard import LikelihoodGuard
from dpo.plugins.stopping.margin_guard import MarginGuard, kl_proxy
from dpo.plugins.stopping.plateau import Plateau
from dpo.testing import CrashAt

DATA = Path(__file__).resolve().parents[1] / "examples" / "pairs.jsonl"
NAMES = {"likelihood-guard": LikelihoodGuard, "plateau": Plateau, "budget": Budget,
         "margin-guard": MarginGuard}
TRAIN = RunContext(objective="dpo", holds_out=False, loss="dpo", loss_options={"beta": 0.1})
HELD_OUT = RunContext(objective="dpo", holds_out=True, loss="dpo", loss_options={"beta": 0.1})


def round_trip(policy):
    """A fresh policy of the same kind and options, with ``policy``'s state as a checkpoint
    keeps it (JSON-safe)."""
    fresh = type(policy)(policy.options)
    fresh.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    return fresh


def test_the_four_are_default_plugins():
    catalog = collect(get_plugin_manager(load_entrypoints=False))
    for name, cls in NAMES.items():
        assert f"dpo.plugins.stopping.{name.replace('-', '_')}" in DEFAULT_PLUGINS
        assert catalog.stopping.get(name) is cls


# -- likelihood-guard ------------------------------------------------------------------------

def test_chosen_log_prob_per_token_is_summed_per_pair_then_averaged_by_the_loop():
    """Two pairs: chosen log-probs -4 over 2 tokens and -9 over 3: -2 and -3 per token, a
    batch sum of -5 (the loop divides by the step's 2 pairs: -2.5). logps/chosen stays the
    summed -13."""
    import torch

    from dpo.core.interfaces.loss import LossOutput, PairLogps
    from dpo.core.training.objectives import metric_sums

    logps = PairLogps(policy_chosen=torch.tensor([-4.0, -9.0]),
                      policy_rejected=torch.tensor([-5.0, -5.0]),
                      chosen_tokens=torch.tensor([2, 3]), rejected_tokens=torch.tensor([1, 1]))
    zeros = torch.zeros(2)
    sums = metric_sums(LossOutput(zeros, zeros, zeros), logps)
    assert sums["logps/chosen_per_token"].item() == pytest.approx(-5.0)
    assert sums["logps/chosen"].item() == pytest.approx(-13.0)


def lg_metrics(logp: float, margin: float, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}logps/chosen_per_token": logp, f"{prefix}rewards/margins": margin}


def test_likelihood_guard_needs_a_drop_and_rising_margins():
    """max_drop 1, training metrics. Step 1 is the start: -2.0 nats/token, margin 0.0.
    Step 2: -2.5 (drop 0.5 <= 1): goes on. Step 3: -3.2 (drop 1.2 > 1) but margin -0.1 is not
    above 0.0 (both rewards fell): goes on. Step 4: -3.1 (drop 1.1 > 1) with margin 0.8 > 0.0:
    stops, saying drop 1.1 and the two margins."""
    policy = LikelihoodGuard(max_drop=1.0)
    policy.prepare(TRAIN)
    assert policy.watches() == ["logps/chosen_per_token", "rewards/margins"]
    seq = [(-2.0, 0.0), (-2.5, 0.5), (-3.2, -0.1), (-3.1, 0.8)]
    decisions = [policy.on_step(i + 1, lg_metrics(*m)) for i, m in enumerate(seq)]
    assert [d.stop for d in decisions] == [False, False, False, True]
    assert "fell 1.1 nats/token" in decisions[-1].reason
    assert "from 0 to 0.8 at step 4" in decisions[-1].reason
    assert not policy.on_eval(4, lg_metrics(-9.0, 5.0, "eval/")).stop  # evaluations ignored


def test_likelihood_guard_warns_once_and_goes_on():
    """action=warn: the same step 4 as above warns (no stop); step 5 (-4.0, margin 1.0: still
    over) says nothing more, and neither does a resumed copy."""
    policy = LikelihoodGuard(max_drop=1.0, action="warn")
    policy.prepare(TRAIN)
    seq = [(-2.0, 0.0), (-2.5, 0.5), (-3.2, -0.1), (-3.1, 0.8), (-4.0, 1.0)]
    decisions = [policy.on_step(i + 1, lg_metrics(*m)) for i, m in enumerate(seq)]
    assert not any(d.stop for d in decisions)
    assert [bool(d.warn) for d in decisions] == [False, False, False, True, False]
    assert not round_trip(policy).on_step(6, lg_metrics(-5.0, 2.0)).warn


def test_likelihood_guard_on_evaluations_and_resumed():
    """auto with held-out data watches eval/: the step-0 evaluation (-1.0, 0.0) is the start.
    Step 10: -1.4 (drop 0.4 <= 0.5). A copy resumed here decides step 20 (-1.6, drop 0.6 > 0.5,
    margin 0.3 > 0) as the original: stop."""
    policy = LikelihoodGuard(max_drop=0.5)
    policy.prepare(HELD_OUT)
    assert policy.watches() == ["eval/logps/chosen_per_token", "eval/rewards/margins"]
    assert not policy.on_step(1, lg_metrics(-99.0, 9.0)).stop  # steps ignored
    policy.on_eval(0, lg_metrics(-1.0, 0.0, "eval/"))
    assert not policy.on_eval(10, lg_metrics(-1.4, 0.2, "eval/")).stop
    resumed = round_trip(policy)
    resumed.prepare(HELD_OUT)
    assert resumed.on_eval(20, lg_metrics(-1.6, 0.3, "eval/")) == policy.on_eval(
        20, lg_metrics(-1.6, 0.3, "eval/"))
    assert resumed.on_eval(20, lg_metrics(-1.6, 0.3, "eval/")).stop


def test_likelihood_guard_refuses_runs_it_cannot_watch():
    with pytest.raises(UsageError, match="needs held-out data"):
        LikelihoodGuard(metric_source="eval").prepare(TRAIN)
    with pytest.raises(UsageError, match="dpo sft does not report"):
        LikelihoodGuard().prepare(RunContext(objective="sft"))
    with pytest.raises(UsageError, match="max_drop"):
        LikelihoodGuard.parse_options({"max_drop": "0"})


# -- plateau ---------------------------------------------------------------------------------

def test_plateau_stops_on_the_moving_mean():
    """window 2, patience 2, mode max on rewards/accuracies. Values 0.0, 0.5, 0.5, 1.0, 0.5,
    0.5. Step 1: the window is not full. Step 2: mean 0.25 (best). Step 3: 0.5 (best). Step 4:
    0.75 (best). Step 5: (1.0 + 0.5) / 2 = 0.75, not above 0.75: 1 without improvement.
    Step 6: 0.5: 2 -> stop, naming the best 0.75 at step 4."""
    policy = Plateau(window=2, patience=2)
    values = [0.0, 0.5, 0.5, 1.0, 0.5, 0.5]
    decisions = [policy.on_step(i + 1, {"rewards/accuracies": v}) for i, v in enumerate(values)]
    assert [d.stop for d in decisions] == [False] * 5 + [True]
    assert "0.75 (step 4)" in decisions[-1].reason and "2 steps" in decisions[-1].reason
    assert not policy.restores_best()


def test_plateau_min_mode_min_delta_and_resume():
    """mode min on loss, window 1, patience 2, min_delta 0.1: 0.7 (best), 0.65 (0.05 is not
    more than 0.1: bad 1), 0.5 (best), nan (never improves: bad 1), 0.45 (bad 2 -> stop). A copy
    resumed after the nan stops at the same step."""
    policy = Plateau(metric="loss", mode="min", window=1, patience=2, min_delta=0.1)
    values = [0.7, 0.65, 0.5, float("nan")]
    assert not any(policy.on_step(i + 1, {"loss": v}).stop for i, v in enumerate(values))
    resumed = round_trip(policy)
    assert resumed.on_step(5, {"loss": 0.45}) == policy.on_step(5, {"loss": 0.45})
    assert resumed.bad_steps == 2 and resumed.best == 0.5


def test_plateau_refuses_an_evaluation_metric():
    with pytest.raises(UsageError, match="use --stop early-stopping"):
        Plateau.parse_options({"metric": "eval/rewards/accuracies"})


# -- budget ----------------------------------------------------------------------------------

def step_metrics(pairs: int, tokens: int, seconds: float, epoch: float) -> dict[str, float]:
    """A step's metrics as the loop writes them: rates over the step's time."""
    return {"samples_per_second": pairs / seconds, "tokens_per_second": tokens / seconds,
            "step_time": seconds, "epoch": epoch}


@pytest.mark.parametrize("given, seconds", [("90s", 90), ("30m", 1800), ("2h", 7200),
                                            ("1.5d", 129600), ("45", 45), (12.5, 12.5)])
def test_budget_reads_durations(given, seconds):
    assert parse_duration(given) == seconds
    assert Budget.parse_options({"max_time": str(given)}).max_time == seconds


def test_budget_bad_options_are_one_line_errors():
    with pytest.raises(UsageError, match="at least one limit"):
        Budget.parse_options({})
    with pytest.raises(UsageError, match="duration such as 90s"):
        Budget.parse_options({"max_time": "2 hours"})
    # Every limit is taken under several processes: the loop makes them agree on a stop.
    Budget(max_time="2h", max_tokens=9, max_pairs=9).prepare(RunContext(world_size=2))


def test_budget_counts_pairs_tokens_and_epochs_over_the_run():
    """max_pairs 10, steps of 4 pairs and 30 tokens in 0.3 s: 4, 8, then 12 >= 10 at step 3
    stops the run (complete, not a pause). The counts survive a resume: a copy resumed after
    step 2 stops at step 3 too. max_tokens 60: 30, 60 >= 60 at step 2. max_epochs 0.5: the
    epoch 0.25, then 0.5 at step 2."""
    policy = Budget(max_pairs=10)
    assert [policy.on_step(s, step_metrics(4, 30, 0.3, s / 8)).stop for s in (1, 2)] == [False] * 2
    resumed = round_trip(policy)
    decision = resumed.on_step(3, step_metrics(4, 30, 0.3, 3 / 8))
    assert decision.stop and not decision.resumable
    assert decision.reason == "12 pairs at step 3 reached max_pairs=10"
    assert decision == policy.on_step(3, step_metrics(4, 30, 0.3, 3 / 8))
    tokens = Budget(max_tokens=60)
    assert [tokens.on_step(s, step_metrics(4, 30, 0.3, 0)).stop for s in (1, 2)] == [False, True]
    epochs = Budget(max_epochs=0.5)
    assert [epochs.on_step(s, step_metrics(4, 30, 0.3, s / 4)).stop for s in (1, 2)] == [False,
                                                                                          True]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_pauses_before_a_step_would_overrun_the_time():
    """max_time 100 s, the clock starting at 0. Step 1 ends at 30 s, its step_time 20 s: the
    longest gap so far is 20 s, 30 + 20 = 50 <= 100. Step 2 ends at 60 s (a gap of 30 s, an
    evaluation included): 60 + 30 = 90 <= 100. Step 3 ends at 75 s: 75 + 30 = 105 > 100, so the
    run pauses (resumable). The clock is the invocation's: a resumed copy starts afresh."""
    clock = FakeClock()
    policy = Budget(max_time="100")
    policy.clock, policy.started = clock, clock()
    decisions = []
    for step, (now, took) in enumerate([(30, 20), (60, 10), (75, 10)], start=1):
        clock.now = now
        decisions.append(policy.on_step(step, step_metrics(4, 30, took, 0)))
    assert [d.stop for d in decisions] == [False, False, True]
    assert decisions[-1].resumable and "75s of max_time=100s used at step 3" in decisions[-1].reason
    assert round_trip(policy).state_dict() == {"tokens": 90, "pairs": 12}


# -- margin-guard ----------------------------------------------------------------------------

def rewards(chosen: float, rejected: float, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}rewards/chosen": chosen, f"{prefix}rewards/rejected": rejected,
            f"{prefix}rewards/margins": chosen - rejected}


def test_kl_proxy_is_the_summed_log_ratio_to_the_reference():
    """beta 0.1, rewards 0.05 and -0.25: log-ratios 0.5 and -2.5, so -(0.5 - 2.5) = 2.0 nats."""
    assert kl_proxy(0.05, -0.25, 0.1) == pytest.approx(2.0)
    assert kl_proxy(0.0, 0.0, 0.1) == 0.0


def test_margin_guard_caps_the_margin():
    """max_margin 1: margins 0.5 (chosen 0.25, rejected -0.25), then 1.2: stop."""
    policy = MarginGuard(max_margin=1.0)
    policy.prepare(TRAIN)
    assert policy.watches() == ["rewards/margins"]
    assert not policy.on_step(1, rewards(0.25, -0.25)).stop
    decision = policy.on_step(2, rewards(0.2, -1.0))
    assert decision.stop and "rewards/margins = 1.2 > max_margin 1" in decision.reason


def test_margin_guard_caps_the_kl_proxy_with_the_loss_beta_and_patience():
    """max_kl 2, the loss's beta 0.1, patience 2. Rewards (0.05, -0.25): KL 2.0, not over.
    (-0.1, -0.2): 3.0 over (1). (0.0, 0.0): 0, the count resets. (-0.2, -0.2): 4.0 (1), and a
    copy resumed here sees (-0.3, 0.0): 3.0 (2 in a row) -> stop, as the original does."""
    policy = MarginGuard(max_kl=2.0, patience=2)
    policy.prepare(TRAIN)
    assert policy.beta == 0.1
    seq = [(0.05, -0.25), (-0.1, -0.2), (0.0, 0.0), (-0.2, -0.2)]
    assert not any(policy.on_step(i + 1, rewards(*r)).stop for i, r in enumerate(seq))
    assert policy.over == 1
    resumed = round_trip(policy)
    resumed.prepare(TRAIN)
    decision = resumed.on_step(5, rewards(-0.3, 0.0))
    assert decision == policy.on_step(5, rewards(-0.3, 0.0))
    assert decision.stop and "= 3 nats > max_kl 2 (beta 0.1)" in decision.reason
    assert "(2 in a row)" in decision.reason


def test_margin_guard_beta_option_eval_source_and_errors():
    """beta given (0.5) wins over the loss's; with held-out data it watches evaluations:
    eval rewards (-0.5, -1.0): KL (0.5 + 1.0) / 0.5 = 3.0 > 2.5."""
    policy = MarginGuard(max_kl=2.5, beta=0.5)
    policy.prepare(HELD_OUT)
    assert policy.beta == 0.5
    assert policy.watches() == ["eval/rewards/chosen", "eval/rewards/rejected"]
    assert not policy.on_step(1, rewards(-9.0, -9.0)).stop
    assert policy.on_eval(10, rewards(-0.5, -1.0, "eval/")).stop
    with pytest.raises(UsageError, match="has no beta option; set -o margin-guard.beta=B"):
        MarginGuard(max_kl=1.0).prepare(RunContext(loss="example-hinge-free", loss_options={}))
    with pytest.raises(UsageError, match="give max_margin, max_kl or both"):
        MarginGuard.parse_options({})


# -- whole runs ------------------------------------------------------------------------------

def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def run_record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def run_args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["run", "--model", "tiny", "--data", str(DATA), "--backend", "cpu", "--batch-size",
            "4", "--max-steps", str(steps), "--save-steps", "2", "--stop", "crash-at",
            "--output", str(out), *extra]


def straight_and_resumed(tmp_path: Path, invoke, crash_at: int, steps: int, *extra: str):
    """An uninterrupted run, and one that crashes at ``crash_at`` and is resumed: they stop
    at the same step, for the same reason, with the same metrics. The first run's record and
    metrics."""
    straight = invoke(*run_args(tmp_path / "straight", steps, *extra))
    assert straight.exit_code == 0, straight.output
    CrashAt.armed_at = crash_at
    crashed = invoke(*run_args(tmp_path / "resumed", steps, *extra))
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output
    resumed = invoke("run", "--resume", str(tmp_path / "resumed"))
    assert resumed.exit_code == 0, resumed.output
    a, b = run_record(tmp_path / "straight"), run_record(tmp_path / "resumed")
    assert (b["status"], b["steps"]) == (a["status"], a["steps"])
    rows = records(tmp_path / "straight")
    assert records(tmp_path / "resumed") == rows
    return a, rows


def test_likelihood_guard_run_stops_on_likelihood_displacement(tmp_path, invoke):
    """lr 5e-2 on the tiny model: the chosen side's per-token log-prob falls while margins
    grow. The run stops at the first step whose metrics meet the rule against step 1's, worked
    out again here from metrics.jsonl; a crash at step 5 and --resume stop there too."""
    record, rows = straight_and_resumed(
        tmp_path, invoke, 5, 20, "--lr", "5e-2", "--stop", "likelihood-guard",
        "-o", "likelihood-guard.max_drop=2")
    start = rows[0]
    fired = [r["step"] for r in rows[1:]
             if start["logps/chosen_per_token"] - r["logps/chosen_per_token"] > 2
             and r["rewards/margins"] > start["rewards/margins"]]
    assert fired and 5 < fired[0] < 20
    assert record["steps"] == fired[0] == rows[-1]["step"]
    assert record["status"].startswith("stopped by likelihood-guard:")
    assert "likelihood displacement" in record["status"]
    assert (tmp_path / "straight" / "final").is_dir()


def test_likelihood_guard_warn_mode_warns_once_and_trains_on(tmp_path, invoke):
    result = invoke(*run_args(tmp_path / "out", 12, "--lr", "5e-2", "--stop",
                              "likelihood-guard", "-o", "likelihood-guard.max_drop=2",
                              "-o", "likelihood-guard.action=warn"))
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert said.count("likelihood-guard: logps/chosen_per_token fell") == 1
    assert run_record(tmp_path / "out")["status"] == "completed"


def test_plateau_run_stops_when_the_smoothed_accuracy_stalls(tmp_path, invoke):
    """window 3, patience 3 on rewards/accuracies, lr 5e-2: the stop step is the one the
    moving-mean rule gives on metrics.jsonl's accuracies, worked out again here."""
    record, rows = straight_and_resumed(
        tmp_path, invoke, 5, 20, "--lr", "5e-2", "--stop", "plateau", "-o", "plateau.window=3",
        "-o", "plateau.patience=3")
    acc = [r["rewards/accuracies"] for r in rows]
    best, bad, stop = None, 0, None
    for i in range(2, len(acc)):
        mean = sum(acc[i - 2:i + 1]) / 3
        if best is None or mean > best:
            best, bad = mean, 0
        else:
            bad += 1
            if bad == 3:
                stop = i + 1
                break
    assert stop is not None and 5 < stop < 20
    assert record["steps"] == stop and record["status"].startswith("stopped by plateau:")


def test_budget_run_stops_at_its_pairs_and_is_complete(tmp_path, invoke):
    """max_pairs 24 with 4 pairs a step: 24 pairs at step 6, a complete run (final/),
    resumed after a crash at step 5 to the same end."""
    record, rows = straight_and_resumed(tmp_path, invoke, 5, 20, "--lr", "1e-3",
                                        "--stop", "budget", "-o", "budget.max_pairs=24")
    assert record["steps"] == 6 and rows[-1]["step"] == 6
    assert record["status"] == "stopped by budget: 24 pairs at step 6 reached max_pairs=24"
    again = invoke("run", "--resume", str(tmp_path / "straight"))
    assert again.exit_code == 0 and "already complete" in again.output


def test_a_run_budget_stopped_goes_on_when_the_limit_it_reached_is_raised(tmp_path, invoke):
    """max_pairs 8 with 4 pairs a step ends the run at step 2. A --resume that changes another
    budget option (a job's max_time) or lowers the limit has nothing to do; one that raises it
    to 16 goes on from checkpoint-2 (8 pairs counted) to 16 pairs at step 4, exactly as a run
    given max_pairs 16 from the start."""
    out = tmp_path / "out"
    first = invoke(*run_args(out, 20, "--stop", "budget", "-o", "budget.max_pairs=8"))
    assert first.exit_code == 0, first.output
    assert run_record(out)["status"] == "stopped by budget: 8 pairs at step 2 reached max_pairs=8"
    for option in ("budget.max_time=2h", "budget.max_pairs=4", "budget.max_pairs=8"):
        again = invoke("run", "--resume", str(out), "-o", option)
        assert again.exit_code == 0 and "already complete" in again.output, option
        assert ("raise the limit it reached to go on, e.g. -o budget.max_pairs=HIGHER"
                in " ".join(again.output.split()))
    more = invoke("run", "--resume", str(out), "--stop", "budget", "-o", "budget.max_pairs=16")
    assert more.exit_code == 0, more.output
    record = run_record(out)
    assert record["status"] == "stopped by budget: 16 pairs at step 4 reached max_pairs=16"
    assert record["steps"] == 4 and (out / "final").is_dir()
    straight = invoke(*run_args(tmp_path / "straight", 20, "--stop", "budget",
                                "-o", "budget.max_pairs=16"))
    assert straight.exit_code == 0, straight.output
    assert records(out) == records(tmp_path / "straight")


@pytest.mark.parametrize("status, before, after, goes_on", [
    ("stopped by budget: 8 pairs at step 2 reached max_pairs=8", "8", "16", True),
    ("stopped by budget: 8 pairs at step 2 reached max_pairs=8", "8", 16, True),
    ("stopped by budget: 8 pairs at step 2 reached max_pairs=8", "8", "8.0", False),
    ("stopped by budget: 8 pairs at step 2 reached max_pairs=8", "8", "4", False),
    ("stopped by budget: 8 pairs at step 2 reached max_pairs=8", "8", None, True),  # no limit
    ("stopped by budget: 1 epochs at step 5 reached max_epochs=1", "1", "1.5", True),
    ("completed", "8", "16", False),  # it ended at its steps, not at the limit
    ("paused by budget: 9s of max_time=8s used at step 2", "8", "16", False),
])
def test_raising_the_reached_limit_reopens_a_stopped_run(status, before, after, goes_on):
    from dpo.core.training.rundir import raised

    key = "max_epochs" if "epochs" in status else "max_pairs"
    recorded = {"options": {"budget": {key: before, "max_time": "1h"}}}
    config = {"options": {"budget": {"max_time": "2h", **({key: after} if after else {})}}}
    assert raised(recorded, config, status) is goes_on


def test_budget_time_pauses_and_resume_goes_on_as_if_uninterrupted(tmp_path, invoke):
    """max_time 1 ms pauses after every step: a checkpoint, no final/, exit 0, status "paused
    by budget"; --resume goes on (a fresh clock each time); with a 1 h budget the run ends
    as an uninterrupted 3-step run does, metrics and all."""
    straight = invoke(*run_args(tmp_path / "straight", 3, "--stop", "budget",
                                "-o", "budget.max_time=1h"))
    assert straight.exit_code == 0, straight.output
    out = tmp_path / "paused"
    first = invoke(*run_args(out, 3, "--stop", "budget", "-o", "budget.max_time=0.001"))
    assert first.exit_code == 0, first.output
    record = run_record(out)
    assert record["status"].startswith("paused by budget:") and record["steps"] == 1
    assert (out / "checkpoint-1").is_dir() and not (out / "final").exists()
    assert f"continue with --resume {out}" in " ".join(first.output.split())
    second = invoke("run", "--resume", str(out))
    assert second.exit_code == 0, second.output
    assert run_record(out)["status"].startswith("paused by budget:")
    assert run_record(out)["steps"] == 2
    last = invoke("run", "--resume", str(out), "-o", "budget.max_time=1h")
    assert last.exit_code == 0, last.output
    assert run_record(out)["status"] == "completed" and (out / "final").is_dir()
    assert records(out) == records(tmp_path / "straight")


def test_budget_time_at_the_last_step_is_the_run_s_end(tmp_path, invoke):
    """A pause asked for at the last step changes nothing: the run is complete."""
    out = tmp_path / "out"
    result = invoke(*run_args(out, 1, "--stop", "budget", "-o", "budget.max_time=0.001"))
    assert result.exit_code == 0, result.output
    assert run_record(out)["status"] == "completed" and (out / "final").is_dir()


def test_margin_guard_run_stops_on_the_kl_proxy(tmp_path, invoke):
    """max_kl 25 nats with the dpo loss's default beta 0.1, patience 2, lr 5e-2: the stop step
    is the first one that ends two steps in a row over 25, worked out again here from
    metrics.jsonl's rewards."""
    record, rows = straight_and_resumed(
        tmp_path, invoke, 5, 20, "--lr", "5e-2", "--stop", "margin-guard",
        "-o", "margin-guard.max_kl=25", "-o", "margin-guard.patience=2")
    over = [-(r["rewards/chosen"] + r["rewards/rejected"]) / 0.1 > 25 for r in rows]
    stop = next(i + 1 for i in range(1, len(over)) if over[i] and over[i - 1])
    assert 5 < stop < 20
    assert record["steps"] == stop and record["status"].startswith("stopped by margin-guard:")
    assert "max_kl 25 (beta 0.1)" in record["status"]


def test_plugins_lists_the_four_with_their_options(invoke):
    result = invoke("plugins", "--json", "--options")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    options = {(r["name"], r["option"]): r for r in report["options"]
               if r["kind"] == "stopping policy"}
    for name, cls in NAMES.items():
        for key, field in cls.Options.model_fields.items():
            assert options[(name, key)]["description"] == field.description
    assert options[("likelihood-guard", "action")]["type"] == "stop|warn"
    assert options[("budget", "max_time")]["default"] is None
    table = invoke("plugins", "--options")
    assert table.exit_code == 0
    for name in NAMES:
        assert name in table.output
