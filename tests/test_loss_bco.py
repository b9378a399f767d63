"""Golden tests of the BCO pair loss (Jung et al. 2024) and of its running mean delta: values
derived by hand in each docstring; and a tiny run crashed and resumed, against an uninterrupted
one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpo.core.interfaces.loss import PairLogps
from dpo.core.interfaces.plugins import collect, get_plugin_manager
from dpo.core.training.loop import TIMING_KEYS
from dpo.plugins.losses.bco import BCOLoss, bco_pair_loss
from dpo.testing import CrashAt

LN2 = 0.6931471805599453


def one_pair(chosen: float, rejected: float) -> PairLogps:
    """One pair with log-ratios r_w = chosen, r_l = rejected (reference log-probs -2), float64,
    the policy's log-probs requiring grad."""
    def t(v: float, g: bool = False) -> torch.Tensor:
        return torch.tensor([v], dtype=torch.float64, requires_grad=g)

    return PairLogps(policy_chosen=t(chosen - 2.0, True), policy_rejected=t(rejected - 2.0, True),
                     chosen_tokens=torch.tensor([1]), rejected_tokens=torch.tensor([1]),
                     ref_chosen=t(-2.0), ref_rejected=t(-2.0))


def test_is_registered_as_a_built_in():
    catalog = collect(get_plugin_manager(load_entrypoints=False))
    assert catalog.losses.get("bco") is BCOLoss and BCOLoss.requires_reference


def test_at_zero_rewards_and_zero_delta_the_loss_is_two_ln2():
    """r_w = r_l = 0, delta = 0: -log sigma(0) - log sigma(-0) = ln 2 + ln 2 = 2 ln 2
    = 1.3862943611198906. Rewards 0; bco/delta = 0; bco/rewards = (0 + 0) / 2 = 0."""
    out = BCOLoss(beta=0.1)(one_pair(0.0, 0.0))
    assert out.losses.item() == pytest.approx(2 * LN2, abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (0.0, 0.0)
    assert out.metrics["bco/delta"].item() == 0.0 and out.metrics["bco/rewards"].item() == 0.0
    assert bco_pair_loss(torch.zeros(3), torch.zeros(3), 0.0).tolist() == pytest.approx(
        [2 * LN2] * 3, abs=1e-6)


def test_value_and_gradient_at_a_known_point_with_delta():
    """beta = 0.5, r_w = 1, r_l = -1; delta = 0.25 (two past steps whose mean rewards sum to
    0.5: 0.5 / 2). beta r_w - delta = 0.5 - 0.25 = 0.25; beta r_l - delta = -0.5 - 0.25 = -0.75.
    L = -log sigma(0.25) - log sigma(0.75) = ln(1 + e^-0.25) + ln(1 + e^-0.75)
      = ln(1.7788007830714049) + ln(1.4723665527410147)
      = 0.5759394198788436 + 0.38687100611489994 = 0.9628104259937436.
    dL/dl_w = -beta (1 - sigma(0.25)) = -0.5 * (1 - 0.5621765008857981) = -0.21891174955710097
    (< 0: raising the chosen log-prob lowers the loss);
    dL/dl_l = beta sigma(beta r_l - delta) = 0.5 * sigma(-0.75) = 0.5 * 0.320821300824607
    = 0.1604106504123035 (> 0: raising the rejected log-prob raises it).
    Rewards 0.5 and -0.5; bco/delta = 0.25; bco/rewards = (0.5 - 0.5) / 2 = 0."""
    loss = BCOLoss(beta=0.5)
    loss.load_state_dict({"total": 0.5, "steps": 2})
    logps = one_pair(1.0, -1.0)
    out = loss(logps)
    assert out.losses.item() == pytest.approx(0.9628104259937436, abs=1e-12)
    out.loss.backward()
    assert logps.policy_chosen.grad.item() == pytest.approx(-0.21891174955710097, abs=1e-12)
    assert logps.policy_rejected.grad.item() == pytest.approx(0.1604106504123035, abs=1e-12)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (0.5, -0.5)
    assert out.metrics["bco/delta"].item() == 0.25 and out.metrics["bco/rewards"].item() == 0.0


def test_delta_is_the_running_mean_of_the_steps_mean_rewards():
    """Steps with mean rewards 0.3, -0.1, 0.4: delta is 0 before any step, then
    0.3 / 1 = 0.3, (0.3 - 0.1) / 2 = 0.1, (0.3 - 0.1 + 0.4) / 3 = 0.2. A step whose mean is
    NaN (a skipped update) leaves it at 0.2. Calling the loss (training or evaluation) never
    moves it: only on_step does."""
    loss = BCOLoss(beta=0.1)
    assert loss.delta == 0.0
    seen = []
    for step, reward in enumerate([0.3, -0.1, 0.4], start=1):
        loss(one_pair(1.0, -1.0))
        loss.on_step(step, {"bco/rewards": reward, "rewards/chosen": 9.0})
        seen.append(loss.delta)
    assert seen == pytest.approx([0.3, 0.1, 0.2], abs=1e-12)
    loss.on_step(4, {"bco/rewards": math.nan})
    assert loss.delta == pytest.approx(0.2, abs=1e-12)
    out = loss(one_pair(0.0, 0.0))
    assert out.metrics["bco/delta"].item() == pytest.approx(0.2, abs=1e-12)
    assert loss.state_dict() == {"total": pytest.approx(0.6), "steps": 3}
    restored = BCOLoss(beta=0.1)
    restored.load_state_dict(json.loads(json.dumps(loss.state_dict())))
    assert restored.delta == loss.delta


def test_in_a_combination_delta_averages_bco_s_own_rewards():
    """dpo (beta 0.1) + bco (beta 0.5) at r_w = 1, r_l = 0: the combination's rewards are dpo's
    (0.1 * 1 = 0.1 and 0), whose mean (0.1 + 0) / 2 = 0.05 is not bco's; bco/rewards is bco's
    own, (0.5 * 1 + 0.5 * 0) / 2 = 0.25, and that is what one step moves delta to (0.25 / 1).
    The state travels under "bco"."""
    from dpo.core.training.combination import Combination
    from dpo.plugins.losses.dpo import DPOLoss

    loss = Combination({"dpo": DPOLoss(beta=0.1), "bco": BCOLoss(beta=0.5)})
    out = loss(one_pair(1.0, 0.0))
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == 0
    metrics = {key: value.mean().item() for key, value in out.metrics.items()}
    assert metrics["bco/rewards"] == pytest.approx(0.25, abs=1e-12)
    loss.on_step(1, metrics)
    assert loss.parts["bco"].delta == pytest.approx(0.25, abs=1e-12)
    assert loss.state_dict() == {"bco": {"total": pytest.approx(0.25), "steps": 1}}


# -- runs ------------------------------------------------------------------------------------

def run_args(pairs: Path, out: Path, steps: int) -> list[str]:
    return ["run", "--model", "tiny", "--data", str(pairs), "--backend", "cpu", "--loss", "bco",
            "-o", "beta=0.5", "--max-steps", str(steps), "--lr", "3e-3", "--batch-size", "4",
            "--eval-fraction", "0.25", "--eval-steps", "2", "--output", str(out)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_a_run_logs_delta_as_the_mean_of_earlier_steps_and_resumes_exactly(tmp_path, pairs,
                                                                            invoke):
    """Six steps, evaluations every two, a checkpoint every two. Each step's bco/delta is the
    mean of the bco/rewards of the steps before it (0 at step 1), evaluations do not move it,
    and bco/rewards is (rewards/chosen + rewards/rejected) / 2. Crashed at step 3 (after the
    checkpoint of step 2) and resumed, the run logs the same metrics at every step, and the
    same weights, as the uninterrupted one: delta came back from the checkpoint."""
    extra = ["--save-steps", "2", "--stop", "crash-at"]
    straight = invoke(*run_args(pairs, tmp_path / "straight", 6), *extra)
    assert straight.exit_code == 0, straight.output
    rows = records(tmp_path / "straight")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for i, r in enumerate(steps):
        before = [s["bco/rewards"] for s in steps[:i]]
        want = sum(before) / len(before) if before else 0.0
        assert r["bco/delta"] == pytest.approx(want, rel=1e-5, abs=1e-7), r["step"]
        assert r["bco/rewards"] == pytest.approx(
            (r["rewards/chosen"] + r["rewards/rejected"]) / 2, rel=1e-4, abs=1e-7)
    assert steps[-1]["bco/delta"] != 0.0  # it did move
    evals = {r["step"]: r for r in rows if "eval/loss" in r}
    # The evaluation after step 2 uses the delta step 3 then trains with.
    assert evals[2]["eval/bco/delta"] == pytest.approx(steps[2]["bco/delta"], rel=1e-6)

    CrashAt.armed_at = 3
    crashed = invoke(*run_args(pairs, tmp_path / "resumed", 6), *extra)
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output
    resumed = invoke("run", "--resume", str(tmp_path / "resumed"))
    assert resumed.exit_code == 0, resumed.output
    state = json.loads((tmp_path / "resumed" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["loss"]["steps"] == 6
    assert deterministic(records(tmp_path / "resumed")) == deterministic(rows)

    # `dpo eval` of the run evaluates with the delta the run ended with (its last checkpoint's):
    # the mean of all six steps' mean rewards; asked for another loss, it starts from none.
    evaluated = invoke("eval", "--model", str(tmp_path / "straight"), "--data", str(pairs),
                       "--backend", "cpu", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    shown = json.loads(evaluated.output[evaluated.output.index("{"):])
    assert shown["loss_state_from"].endswith("checkpoint-6")
    final_delta = sum(s["bco/rewards"] for s in steps) / len(steps)
    assert shown["metrics"]["bco/delta"] == pytest.approx(final_delta, rel=1e-5)
    fresh = invoke("eval", "--model", str(tmp_path / "straight"), "--data", str(pairs),
                   "--backend", "cpu", "--json", "--loss", "bco", "-o", "beta=0.5")
    assert json.loads(fresh.output[fresh.output.index("{"):])["metrics"]["bco/delta"] == 0.0

    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_delta_is_the_same_however_a_step_is_split_into_micro_batches(tmp_path, pairs, invoke):
    """One micro-batch of 4 pairs per step, or two of 2 (in file order, so that a step holds
    the same 4 pairs either way): each step's mean reward is over those 4 pairs, so the deltas
    agree (to float32 summation order)."""
    common = ["--no-eval-at-start", "--save-steps", "0", "--no-shuffle", "--no-group-by-length"]
    one = invoke(*run_args(pairs, tmp_path / "one", 3), *common)
    two = invoke(*run_args(pairs, tmp_path / "two", 3), *common, "--batch-size", "2",
                 "--grad-accum", "2")
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    a = [r["bco/delta"] for r in records(tmp_path / "one") if "loss" in r]
    b = [r["bco/delta"] for r in records(tmp_path / "two") if "loss" in r]
    assert a[0] == b[0] == 0.0 and a[2] != 0.0
    assert b == pytest.approx(a, rel=1e-4, abs=1e-7)


def test_dpo_eval_of_a_run_that_restored_its_best_weights_uses_their_delta(tmp_path, pairs,
                                                                           invoke):
    """early-stopping watches the learning rate (mode max, patience beyond the run): with 2
    warmup steps of 5, the linear schedule gives lr 1/3, 2/3, 1, 2/3, 1/3 of --lr, so the best
    step is 3, not the last one, by construction (it is read from metrics.jsonl all the same).
    The run ends with step 3's weights in final/; their loss state, BCO's delta after step 3
    (the mean of steps 1-3's bco/rewards, the delta step 4 logs), is kept with them in best/,
    and `dpo eval` of the run, of its final/ and of its best/ evaluates with it, not with the
    last step's delta (the mean of all five)."""
    out = tmp_path / "out"
    result = invoke(*run_args(pairs, out, 5), "--warmup-steps", "2", "--no-eval-at-start",
                    "--save-steps", "0", "--stop", "early-stopping",
                    "-o", "early-stopping.metric=lr", "-o", "early-stopping.patience=10")
    assert result.exit_code == 0, result.output
    steps = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    best = max(steps, key=lambda r: r["lr"])["step"]  # max keeps the first of equals
    assert best < steps[-1]["step"]
    run = json.loads((out / "run.json").read_text())
    assert run["restored_best_from_step"] == best
    rewards = [r["bco/rewards"] for r in steps]
    at_best = sum(rewards[:best]) / best
    assert steps[best]["bco/delta"] == pytest.approx(at_best, rel=1e-5)  # step best+1's delta
    at_end = sum(rewards) / len(rewards)
    assert at_best != pytest.approx(at_end, rel=1e-3)  # so the test tells them apart
    for model in (out, out / "final", out / "best"):
        evaluated = invoke("eval", "--model", str(model), "--data", str(pairs), "--backend",
                           "cpu", "--json")
        assert evaluated.exit_code == 0, evaluated.output
        shown = json.loads(evaluated.output[evaluated.output.index("{"):])
        assert Path(shown["loss_state_from"]) == out / "best", model
        assert shown["metrics"]["bco/delta"] == pytest.approx(at_best, rel=1e-5), model
