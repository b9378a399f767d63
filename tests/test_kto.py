"""KTO on unpaired data: the loss's golden values, the ``unpaired`` format and its one-line
errors, the batches' mismatched rows and the KL estimate, and ``dpo run --loss kto`` end to end
(metrics, held-out evaluation, resume after a crash)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from dpo.core.data.batching import collate_examples
from dpo.core.data.reading import SourcedDemonstration, load_pairs, load_unpaired
from dpo.core.data.tokenization import TokenizedExample, tokenize_demonstrations
from dpo.core.data.unpaired import (TokenizedUnpaired, collate_unpaired, mismatched,
                                    tokenize_unpaired)
from dpo.core.interfaces.data_format import Demonstration, LabeledCompletion
from dpo.core.interfaces.errors import DataError
from dpo.core.interfaces.loss import Loss, UnpairedLogps
from dpo.core.interfaces.plugins import DEFAULT_PLUGINS, collect, get_plugin_manager
from dpo.core.model.loading import load_model
from dpo.core.model.logps import batch_logps
from dpo.core.model.paths import PLAIN
from dpo.core.training.loop import TIMING_KEYS
from dpo.core.training.unpaired import KtoObjective, kl_estimate, per_label
from dpo.plugins.losses.kto import KTOLoss, kto_loss
from dpo.plugins.formats.unpaired import UnpairedFormat
from dpo.testing import CrashAt

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "unpaired.jsonl"


@pytest.fixture(scope="module")
def catalog():
    return collect(get_plugin_manager(load_entrypoints=False))


def kto(**options) -> KTOLoss:
    return KTOLoss(KTOLoss.parse_options(options))


# -- the loss ----------------------------------------------------------------------------------

def test_kto_is_a_builtin_unpaired_loss(catalog):
    assert "dpo.plugins.losses.kto" in DEFAULT_PLUGINS
    assert catalog.losses.get("kto") is KTOLoss
    assert KTOLoss.examples == "unpaired" and KTOLoss.requires_reference
    assert Loss.examples == "pairs" and catalog.losses.get("dpo").examples == "pairs"
    o = kto().options
    assert (o.beta, o.desirable_weight, o.undesirable_weight) == (0.1, 1.0, 1.0)


def test_at_the_reference_the_loss_is_half_of_each_weight():
    """r = 0 and z_ref = 0: v = lambda_y sigma(0) = lambda_y / 2, so the loss is
    lambda_y - lambda_y/2: with lambda_D = 1 and lambda_U = 3, 0.5 (desirable) and 1.5
    (undesirable)."""
    r = torch.zeros(2)
    labels = torch.tensor([True, False])
    losses = kto_loss(r, labels, torch.tensor(0.0), beta=0.1, desirable_weight=1.0,
                      undesirable_weight=3.0)
    torch.testing.assert_close(losses, torch.tensor([0.5, 1.5]))


def test_a_known_point():
    """beta = 0.5, r = 2, KL estimate 0.4 (z_ref = 0.4):
    desirable: 1 - sigma(0.5 * (2 - 0.4)) = 1 - sigma(0.8) = 1 - 0.689974481 = 0.310025519;
    undesirable (lambda_U = 2): 2 - 2 sigma(0.5 * (0.4 - 2)) = 2 - 2 sigma(-0.8)
    = 2 - 2 * 0.310025519 = 1.379948962."""
    losses = kto_loss(torch.tensor([2.0, 2.0]), torch.tensor([True, False]), torch.tensor(0.4),
                      beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    torch.testing.assert_close(losses, torch.tensor([0.310025519, 1.379948962]))


def test_a_negative_kl_estimate_is_clamped_at_zero():
    """z_ref = max(0, -3) = 0: the same losses as with an estimate of 0; r = 1, beta = 1:
    desirable 1 - sigma(1) = 0.268941421, undesirable 1 - sigma(-1) = 0.731058579."""
    r, labels = torch.tensor([1.0, 1.0]), torch.tensor([True, False])
    clamped = kto_loss(r, labels, torch.tensor(-3.0), beta=1.0)
    torch.testing.assert_close(clamped, torch.tensor([0.268941421, 0.731058579]))
    torch.testing.assert_close(clamped, kto_loss(r, labels, torch.tensor(0.0), beta=1.0))
    out = kto(beta=1.0)(UnpairedLogps(policy=r, labels=labels, tokens=torch.ones(2),
                                      kl=torch.tensor(-3.0), reference=torch.zeros(2)))
    assert out.metrics["kl"].item() == 0.0  # the metric is z_ref, as TRL logs it


def test_gradients_push_desirable_up_and_undesirable_down_and_skip_the_kl():
    """dL/dr for a desirable example is -beta lambda_D s (1 - s) < 0, with s = sigma(beta (r -
    z)), so descent raises r; for an undesirable one it is +beta lambda_U s (1 - s) > 0, so
    descent lowers r. At r = 0, z = 0, beta = 0.1: |dL/dr| = 0.1 * 0.5 * 0.5 = 0.025. No
    gradient reaches the KL estimate: it is detached."""
    r = torch.zeros(2, requires_grad=True)
    kl = torch.tensor(0.0, requires_grad=True)
    kto_loss(r, torch.tensor([True, False]), kl, beta=0.1).sum().backward()
    torch.testing.assert_close(r.grad, torch.tensor([-0.025, 0.025]))
    assert kl.grad is None


def test_rewards_are_beta_times_the_summed_log_ratios():
    out = kto(beta=0.5)(UnpairedLogps(policy=torch.tensor([-3.0, -5.0]),
                                      labels=torch.tensor([True, False]),
                                      tokens=torch.tensor([2, 3]), kl=torch.tensor(0.0),
                                      reference=torch.tensor([-4.0, -4.0])))
    # r = (-3 + 4, -5 + 4) = (1, -1); rewards 0.5 r.
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, -0.5]))
    assert not out.chosen_rewards.requires_grad


def test_metrics_are_means_over_each_label():
    """Averages over 4 examples (3 desirable with rewards 1, 2, 3; 1 undesirable with reward
    -4): rewards/chosen sum 6 / 4 = 1.5, count/chosen 3/4, so the desirable mean is
    1.5 / 0.75 = 2; rewards/rejected -4/4 = -1 over 1/4: -4; margins 2 - (-4) = 6."""
    got = per_label({"loss": 0.5, "rewards/chosen": 1.5, "rewards/rejected": -1.0,
                     "count/chosen": 0.75, "count/rejected": 0.25, "kl": 0.1})
    assert got == {"loss": 0.5, "rewards/chosen": 2.0, "rewards/rejected": -4.0,
                   "rewards/margins": 6.0, "kl": 0.1, "fraction/chosen": 0.75}
    only_chosen = per_label({"loss": 0.5, "rewards/chosen": 1.0, "rewards/rejected": 0.0,
                             "logps/rejected": 0.0, "count/chosen": 1.0, "count/rejected": 0.0})
    assert "rewards/rejected" not in only_chosen and "rewards/margins" not in only_chosen


# -- the format --------------------------------------------------------------------------------

def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_unpaired_records_are_detected_apart_from_demonstrations(catalog):
    assert "dpo.plugins.formats.unpaired" in DEFAULT_PLUGINS
    assert catalog.formats.get("unpaired") is UnpairedFormat
    assert UnpairedFormat.detect({"prompt": "a", "completion": "b", "label": True})
    assert not catalog.formats.get("prompt-completion").detect(
        {"prompt": "a", "completion": "b", "label": True})
    assert not UnpairedFormat.detect({"prompt": "a", "completion": "b"})
    assert not UnpairedFormat.detect({"prompt": "a", "chosen": "b", "rejected": "c"})


def test_the_example_file_reads_as_labelled_examples(catalog):
    examples = load_unpaired(EXAMPLE, catalog.formats)
    assert len(examples) == 20
    assert sum(e.example.label for e in examples) == 10
    assert examples[0].example == LabeledCompletion("What is 1 plus 1? Answer: ", "2.", True)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "completion": "c", "label": "yes"},
     "unpaired format: field 'label' must be a boolean (true: desirable, false: undesirable), "
     "got string 'yes'"),
    ({"prompt": "p", "completion": "c", "label": 1},
     "field 'label' must be a boolean (true: desirable, false: undesirable), got number 1"),
    ({"prompt": "p", "completion": "c"}, "missing field 'label'"),
    ({"completion": "c", "label": False}, "missing field 'prompt'"),
])
def test_bad_records_are_one_line_errors_with_file_and_line(tmp_path, catalog, record, message):
    path = write(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "c", "label": True},
                                        record])
    with pytest.raises(DataError) as err:
        load_unpaired(path, catalog.formats)
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


def test_pairs_are_unpaired_and_demonstrations_refused(tmp_path, catalog):
    pairs = write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "good", "rejected": "bad"}])
    assert [e.example for e in load_unpaired(pairs, catalog.formats)] == [
        LabeledCompletion("p", "good", True), LabeledCompletion("p", "bad", False)]
    demos = write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: .*without a label.*\"label\": true"):
        load_unpaired(demos, catalog.formats)
    unpaired = write(tmp_path / "u.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    with pytest.raises(DataError, match=r"u.jsonl:1: .*not a preference pair.*--loss kto"):
        load_pairs(unpaired, catalog.formats)


def test_chat_messages_tokenise_as_demonstrations_do(tmp_path, catalog):
    """A prompt given as messages is rendered with the chat template, exactly as the same
    demonstration would be."""
    _, tokenizer = load_model("tiny", 0)
    record = {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
              "completion": "4.", "label": False}
    path = write(tmp_path / "chat.jsonl", [record])
    examples = load_unpaired(path, catalog.formats)
    got, _ = tokenize_unpaired(tokenizer, examples, 64, 32)
    demo = SourcedDemonstration(Demonstration(record["prompt"], "4."), str(path), 1)
    want, _ = tokenize_demonstrations(tokenizer, [demo], 64, 32)
    assert got == [TokenizedUnpaired(want[0], False)]


# -- batches, mismatched rows and the KL estimate ---------------------------------------------

def ex(prompt: tuple[int, ...], completion: tuple[int, ...], label: bool = True,
       untrained: tuple[tuple[int, int], ...] = ()) -> TokenizedUnpaired:
    return TokenizedUnpaired(TokenizedExample(prompt + completion, len(prompt), untrained),
                             label)


def test_mismatched_rows_pair_each_prompt_with_the_previous_completion():
    """Rows N + i hold prompt i with completion i - 1 (cyclically), cut to the longer of the
    two examples' rows."""
    a, b, c = ex((1, 2), (3,)), ex((4,), (5, 6, 7), False), ex((8, 9, 10), (11,))
    batch = collate_unpaired([a, b, c], pad_token_id=0)
    assert batch.input_ids.shape[0] == 6 and batch.labels.tolist() == [True, False, True]
    rows = [tuple(batch.input_ids[r, :batch.row_lengths[r]].tolist()) for r in range(6)]
    assert rows[:3] == [(1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
    assert rows[3:] == [(1, 2, 11), (4, 3), (8, 9, 10, 5)]  # the last cut at 4 = len(b's row)
    assert batch.completion_mask[3].tolist()[:3] == [False, False, True]
    assert mismatched(c.example, b.example).prompt_length == 3
    # A multi-turn completion's untrained span moves with it.
    moved = mismatched(a.example, ex((5,), (6, 7, 8), untrained=((2, 3),)).example)
    assert moved.ids == (1, 2, 6, 7) and moved.untrained == ((3, 4),)


def test_the_kl_estimate_comes_from_the_mismatched_rows_detached():
    """KtoObjective's KL is the mean over the mismatched rows of policy minus reference summed
    log-probs, computed here row by row from those rows alone; it is not the matched rows'
    mean log-ratio, and it carries no graph."""
    torch.manual_seed(0)
    policy, tokenizer = load_model("tiny", 0)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    examples = [ex((5, 6, 7), (8, 9)), ex((10, 11), (12, 13, 14), False),
                ex((15, 16, 17, 18), (19,))]
    from dpo.backends.cpu import CPUBackend

    objective = KtoObjective(CPUBackend(), torch.float32, tokenizer.pad_token_id, kto(),
                             reference=reference)
    batch = objective.collate(examples)
    logps = objective.logps(policy, batch)
    assert not logps.kl.requires_grad and logps.policy.requires_grad

    def row_logps(model, row):
        return batch_logps(model, collate_examples([row], tokenizer.pad_token_id),
                           PLAIN)[0][0].item()

    rows = [mismatched(examples[i].example, examples[i - 1].example) for i in range(3)]
    with torch.no_grad():
        want = sum(row_logps(policy, r) - row_logps(reference, r) for r in rows) / 3
        matched = (logps.policy - logps.reference).mean().item()
    assert logps.kl.item() == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert abs(matched - want) > 1e-3


def test_the_kl_estimate_keeps_float64_and_raises_half_precision_to_float32():
    """kl_estimate is the mean of policy - reference over the mismatched rows: for policy
    [-1.1, -2.2, -0.4] and reference [-1.2, -2.4, -0.8] the differences are 0.1, 0.2, 0.4 and
    the mean 0.7 / 3. Float64 inputs keep float64 (as exact as the mean itself); bfloat16 is
    raised to float32 before the sum; no row is 0."""
    policy = torch.tensor([-1.1, -2.2, -0.4], dtype=torch.float64)
    reference = torch.tensor([-1.2, -2.4, -0.8], dtype=torch.float64)
    kl = kl_estimate(policy, reference)
    assert kl.dtype == torch.float64
    assert kl.item() == pytest.approx(0.7 / 3, rel=1e-15)
    half = kl_estimate(policy.bfloat16(), reference.bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(0.7 / 3, rel=2e-2)
    assert kl_estimate(policy[:0], reference[:0]).item() == 0.0


# -- dpo run --loss kto ------------------------------------------------------------------------

def write_unpaired(path: Path, n: int = 16) -> Path:
    """Arithmetic questions, alternately answered right (desirable) and wrong (undesirable)."""
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        right = i % 2 == 0
        rows.append({"prompt": f"What is {a} plus {b}? ",
                     "completion": f"{a + b if right else a + b + 1}.", "label": right})
    return write(path, rows)


def common(data: Path, out: Path, steps: int = 3) -> list[str]:
    return ["--model", "tiny", "--data", str(data), "--loss", "kto", "--backend", "cpu",
            "--max-steps", str(steps), "--lr", "1e-3", "--batch-size", "4", "--no-shuffle",
            "--no-group-by-length", "--output", str(out)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def deterministic(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_a_tiny_kto_run_reports_finite_trl_metrics(tmp_path, invoke):
    data = write_unpaired(tmp_path / "u.jsonl")
    result = invoke("run", *common(data, tmp_path / "out"), "--eval-fraction", "0.25",
                    "-o", "kto.undesirable_weight=1.5")
    assert result.exit_code == 0, result.output
    rows = records(tmp_path / "out")
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [0, 3]
    for r in steps:
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                    "logps/chosen", "logps/rejected", "fraction/chosen", "grad_norm"):
            assert math.isfinite(r[key]), (r["step"], key)
        assert r["kl"] >= 0
    # At step 0 the policy is its reference: r = 0, z_ref = 0, so the loss is the mean of
    # lambda_y / 2 over the held-out examples' labels.
    first = evals[0]
    n_chosen = first["eval/fraction/chosen"]
    assert first["eval/loss"] == pytest.approx(n_chosen * 0.5 + (1 - n_chosen) * 0.75)
    assert first["eval/kl"] == 0 and first["eval/rewards/chosen"] == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["resolved"]["objective"] == "dpo" and "in memory" in run["resolved"]["reference"]
    assert run["data"]["train"]["examples_kept"] == 12


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, invoke):
    data = write_unpaired(tmp_path / "u.jsonl")
    extra = ["--save-steps", "2", "--stop", "crash-at", "--eval-fraction", "0.25"]
    assert invoke("run", *common(data, tmp_path / "straight", 4), *extra).exit_code == 0
    CrashAt.armed_at = 3  # after the checkpoint at step 2
    crashed = invoke("run", *common(data, tmp_path / "resumed", 4), *extra)
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output
    resumed = invoke("run", "--resume", str(tmp_path / "resumed"))
    assert resumed.exit_code == 0, resumed.output
    assert (deterministic(records(tmp_path / "resumed"))
            == deterministic(records(tmp_path / "straight")))


def test_samples_of_unpaired_examples_record_their_label(tmp_path, invoke):
    """--sample-prompts with KTO: each held-out example's one completion is its desirable
    (``chosen``) or undesirable (``rejected``) answer, by its label, and the line says the
    label. The held-out file's first two examples are "What is 1 plus 2? " answered "3."
    (right: desirable) and "What is 2 plus 3? " answered "6." (wrong: undesirable).
    ``dpo sample`` of the run's model writes the run's last lines."""
    data = write_unpaired(tmp_path / "u.jsonl")
    held = write_unpaired(tmp_path / "held.jsonl", 4)
    out = tmp_path / "out"
    done = invoke("run", *common(data, out, 2), "--eval-data", str(held),
                  "--sample-prompts", "2", "--sample-max-new-tokens", "3")
    assert done.exit_code == 0, done.output
    got = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["index"]) for r in got] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    for r in got:
        assert set(r) == {"step", "index", "prompt", "chosen", "rejected", "completion",
                          "label"}
        assert isinstance(r["completion"], str)
    assert got[0]["prompt"].startswith("What is 1 plus 2?")
    assert (got[0]["label"], got[0]["chosen"], got[0]["rejected"]) == (True, "3.", None)
    assert got[1]["prompt"].startswith("What is 2 plus 3?")
    assert (got[1]["label"], got[1]["chosen"], got[1]["rejected"]) == (False, None, "6.")
    again = invoke("sample", "--model", str(out), "--data", str(held), "-n", "2",
                   "--max-new-tokens", "3", "--json")
    assert again.exit_code == 0, again.output
    assert [json.loads(line) for line in again.stdout.splitlines()] == got[2:]
    shown = invoke("sample", "--model", str(out), "--data", str(held), "-n", "2",
                   "--max-new-tokens", "3")
    assert shown.exit_code == 0, shown.output
    assert "desirable:" in shown.stdout and "undesirable:" in shown.stdout
    assert "chosen:" not in shown.stdout


def test_kto_trains_on_pairs_unpaired(tmp_path, invoke, pairs):
    """Preference pairs are unpaired as they are read: the 24 arithmetic pairs are 48
    examples, 24 of each label."""
    result = invoke("run", *common(pairs, tmp_path / "out", 1))
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert len(pairs.read_text().splitlines()) == 24
    assert run["data"]["train"]["examples_kept"] == 48
    assert "48 training examples" in result.output


def one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_refusals_are_one_line_and_write_nothing(tmp_path, invoke):
    data = write_unpaired(tmp_path / "u.jsonl")
    dpo_args = [a if a != "kto" else "dpo" for a in common(data, tmp_path / "a")]
    one_line_error(invoke("run", *dpo_args), 2, "u.jsonl:1:", "--loss kto")
    one_line_error(invoke("run", *common(data, tmp_path / "b"), "--batch-size", "1"), 2,
                   "--batch-size 2 or more")
    one_line_error(invoke("run", *common(data, tmp_path / "c"), "--ref-logps",
                          str(tmp_path / "r.safetensors")), 2, "drop --ref-logps")
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c", "label": "no"}])
    one_line_error(invoke("run", *common(bad, tmp_path / "d")), 2, "bad.jsonl:1:",
                   "must be a boolean")
    one_line_error(invoke("sft", "--model", "tiny", "--data", str(data), "--backend", "cpu",
                          "--output", str(tmp_path / "e")), 2, "u.jsonl:1:",
                   "dpo run --loss kto")
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_dpo_eval_scores_unpaired_examples(catalog):
    """``dpo eval --loss kto`` on the example file, the policy its own reference: r = 0 and
    z_ref = 0 on every example, so the loss is lambda_y / 2 = 0.5 for all 20, with zero rewards
    and KL."""
    from dpo.core.training.evaluation import EvalRequest, evaluate_request

    result = evaluate_request(EvalRequest(model="tiny", ref="tiny", data=str(EXAMPLE),
                                          loss="kto", backend="cpu", batch_size=4), catalog)
    assert result["examples"] == 20 and "pairs" not in result
    metrics = result["metrics"]
    assert metrics["loss"] == pytest.approx(0.5) and metrics["kl"] == 0
    assert metrics["rewards/chosen"] == 0 and metrics["fraction/chosen"] == 0.5
    assert math.isfinite(metrics["logps/chosen"]) and math.isfinite(metrics["logps/rejected"])


@pytest.mark.parametrize("flags, reference", [
    (["--ref-model", "tiny"], "--ref-model tiny, frozen, in memory"),
    (["--lora"], "the policy itself with its adapter switched off"),
])
def test_the_reference_may_be_another_model_or_the_lora_base(tmp_path, invoke, flags,
                                                             reference):
    data = write_unpaired(tmp_path / "u.jsonl", 8)
    result = invoke("run", *common(data, tmp_path / "out", 1), *flags)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert reference in run["resolved"]["reference"]
    assert math.isfinite(records(tmp_path / "out")[-1]["loss"])


def test_a_loss_saying_it_trains_on_something_else_is_refused():
    from dpo.core.interfaces.registry import Registry

    class Odd(KTOLoss):
        name = "odd"
        examples = "triples"

    registry = Registry("loss", Loss)
    with pytest.raises(TypeError, match="examples must be 'pairs' or 'unpaired', got 'triples'"):
        registry.add(Odd, provider="tests")
