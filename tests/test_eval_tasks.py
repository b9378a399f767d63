"""Downstream benchmarks through EleutherAI's lm-eval harness: ``dpo eval --tasks`` and
``dpo run --eval-tasks``, on small local tasks whose data each test writes (no hub).

The golden values are computed here independently of ``dpo.core.model.harness``: with the
project's own log-prob code (``completion_logps``) or a plain forward and an argmax loop."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.interfaces.plugins import get_plugin_manager
from dpo.core.model.logps import completion_logps
from dpo.core.model.tiny import build_tiny_model, build_tiny_tokenizer

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra (lm-eval)")

from dpo.backends.cpu import CPUBackend  # noqa: E402
from dpo.core.training import tasks as harness_tasks  # noqa: E402

SEED = 42  # `dpo eval --model tiny` builds the tiny model from this seed (the default)

# Three one-digit choices a question: every choice has the same tokens' count, so that the
# scores differ by what the model predicts, not by the choices' lengths.
QUESTIONS = [(f"Q: what is {i} plus {j}?\nA:", [f" {(i + j) % 10}", f" {(i + j + 1) % 10}",
                                                f" {(i * j + 7) % 10}"], (i + j) % 3)
             for i, j in [(1, 2), (3, 4), (5, 1), (2, 2), (6, 3), (4, 4), (7, 1), (8, 9), (2, 5),
                          (9, 9), (3, 3), (6, 1)]]
PROMPTS = ["Say yes:", "Count: 1 2", "Hello", "The end"]
MAX_GEN = 6


@pytest.fixture
def app():
    return make_app(get_plugin_manager(load_entrypoints=False))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may reach the hub: the tasks read local JSONL files."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer, seed=SEED), tokenizer


def greedy(model, tokenizer, prompt: str, steps: int = MAX_GEN) -> str:
    """Greedy decoding by hand: one plain forward per token, cut at the first newline."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new).split("\n")[0]


def write_tasks(directory: Path, gen_answers: list[str] | None = None) -> Path:
    """A multiple-choice task (toy_mc) and, with ``gen_answers``, a generate_until task
    scored by exact_match (toy_gen), in the harness's YAML over JSONL files."""
    directory.mkdir(parents=True, exist_ok=True)
    mc = directory / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                          for q, c, a in QUESTIONS))
    (directory / "toy_mc.yaml").write_text(f"""task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    if gen_answers is not None:
        gen = directory / "gen.jsonl"
        gen.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n"
                               for p, a in zip(PROMPTS, gen_answers)))
        (directory / "toy_gen.yaml").write_text(f"""task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {MAX_GEN}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return directory


def hand_accuracy() -> tuple[float, list[bool]]:
    """toy_mc's accuracy computed without the harness wrapper: for each question, the summed
    log-prob of each choice's tokens after the question (the harness puts its target delimiter,
    a space, between them), from ``completion_logps`` on the tiny model; a question counts when
    its answer has the highest."""
    model, tokenizer = tiny()
    right = []
    counts = set()
    for question, choices, answer in QUESTIONS:
        scores = []
        for choice in choices:
            context = tokenizer(question, add_special_tokens=False)["input_ids"]
            whole = tokenizer(question + " " + choice, add_special_tokens=False)["input_ids"]
            assert whole[:len(context)] == context
            counts.add(len(whole) - len(context))
            ids = torch.tensor([whole])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(context):] = True
            with torch.no_grad():
                logps, _ = completion_logps(model, ids, torch.ones_like(ids), mask)
            scores.append(float(logps[0]))
        right.append(max(range(len(choices)), key=scores.__getitem__) == answer)
    assert len(counts) == 1  # every choice the same length in tokens
    return sum(right) / len(right), right


def test_multiple_choice_accuracy_matches_an_independent_computation(tmp_path, app):
    """`dpo eval --model tiny --tasks DIR --json`: toy_mc's acc is the share of questions
    whose answer the tiny model scores highest (``hand_accuracy``), and its stderr is the
    harness's standard error of a mean of n 0/1 values, sqrt(p (1 - p) / (n - 1)) (the sample
    standard deviation sqrt(n p (1 - p) / (n - 1)) over sqrt(n))."""
    tasks = write_tasks(tmp_path / "tasks")
    expected, right = hand_accuracy()
    assert 0 < sum(right) < len(right)  # neither all nor none: the check can tell
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--tasks", str(tasks),
                                      "--backend", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    (scores,) = json.loads(result.output)["tasks"]
    acc = scores["metrics"]["toy_mc"]["acc"]
    n = len(QUESTIONS)
    assert acc["value"] == pytest.approx(expected, abs=1e-12)
    assert acc["stderr"] == pytest.approx(math.sqrt(expected * (1 - expected) / (n - 1)))
    assert scores["n-samples"]["toy_mc"]["effective"] == n
    assert scores["file"] is None  # tiny belongs to no run, and no --output was given


def test_loglikelihood_is_the_sum_of_the_continuations_token_logprobs():
    """HarnessLM.loglikelihood("The cat", " sat on") = sum over the continuation's tokens of
    log softmax(logits at the token before)[token], from one plain forward of the whole text;
    a space ending the context moves to the continuation (the same tokens, the same value);
    is_greedy is true exactly when every continuation token is the argmax."""
    from lm_eval.api.instance import Instance

    model, tokenizer = tiny()
    lm = harness_tasks.harness_lm(model, tokenizer, CPUBackend(), torch.float32,
                                  torch.device("cpu"), batch_size=2)
    context, continuation = "The cat", " sat on"
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    expected = sum(float(logps[t - 1, ids[t]]) for t in range(n_context, len(ids)))
    greedy_next = int(logps[len(ids) - 1].argmax())
    greedy_text = tokenizer.decode([greedy_next])

    def request(ctx, cont):
        return Instance("loglikelihood", {}, (ctx, cont), 0)

    got = lm.loglikelihood([request(context, continuation), request("The cat ", "sat on"),
                            request(context + continuation, greedy_text),
                            request("", "The")])
    assert got[0][0] == pytest.approx(expected, abs=1e-4)
    assert got[1][0] == pytest.approx(expected, abs=1e-4)
    assert got[0][1] is all(int(logps[t - 1].argmax()) == ids[t]
                            for t in range(n_context, len(ids)))
    assert got[2][1] is True
    # An empty context: the continuation's first token is predicted from the EOS token
    # (the tiny tokenizer has no BOS).
    the = tokenizer("The", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        start = torch.log_softmax(model(input_ids=torch.tensor(
            [[tokenizer.eos_token_id, *the]])).logits[0].double(), -1)
    assert got[3][0] == pytest.approx(sum(float(start[i, t]) for i, t in enumerate(the)),
                                      abs=1e-4)


def test_a_request_longer_than_the_window_keeps_its_last_tokens():
    """With max_length 4, ("The cat", " sat on the mat") scores the last 4 tokens, each given
    the tokens before it inside the last 5 (one forward of those 5 tokens alone)."""
    from lm_eval.api.instance import Instance

    model, tokenizer = tiny()
    ids = tokenizer("The cat sat on the mat", add_special_tokens=False)["input_ids"][-5:]
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    expected = sum(float(logps[t - 1, ids[t]]) for t in range(1, 5))
    lm = harness_tasks.harness_lm(model, tokenizer, CPUBackend(), torch.float32,
                                  torch.device("cpu"), batch_size=2, max_length=4)
    ((value, _),) = lm.loglikelihood([Instance("loglikelihood", {}, ("The cat",
                                                                     " sat on the mat"), 0)])
    assert value == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_predicts_every_token_once():
    """loglikelihood_rolling of a text: the log-prob of all its tokens from the prefix token,
    in one window when it fits; cut into windows of 8, still one term per token (each window
    scores its own tokens only, so a short window changes values but never the count)."""
    from lm_eval.api.instance import Instance

    model, tokenizer = tiny()
    text = "one two three four five six seven"
    ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    expected = sum(float(logps[t - 1, ids[t]]) for t in range(1, len(ids)))
    lm = harness_tasks.harness_lm(model, tokenizer, CPUBackend(), torch.float32,
                                  torch.device("cpu"), batch_size=3)
    (whole,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert whole == pytest.approx(expected, abs=1e-4)
    windowed = harness_tasks.harness_lm(model, tokenizer, CPUBackend(), torch.float32,
                                        torch.device("cpu"), batch_size=3, max_length=8)
    scored = []
    original = windowed.score_tokens
    windowed.score_tokens = lambda pairs: scored.extend(pairs) or original(pairs)
    windowed.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert sum(len(cont) for _, cont in scored) == len(ids) - 1
    assert all(len(ctx) + len(cont) <= 9 for ctx, cont in scored)


def test_generate_until_exact_match_and_a_run_directory_keeps_the_results(tmp_path, app):
    """toy_gen's answers are the tiny model's own greedy continuations (decoded by hand, cut
    at the newline) for the first two prompts and a string it cannot produce for the last
    two: exact_match = 2/4, stderr sqrt(0.25 / 3). Scored for a run directory, the harness's
    results land in RUN/eval-tasks/final.json (results, configs, versions, n-samples), and a
    second evaluation with another task keeps the first one's."""
    model, tokenizer = tiny()
    answers = [greedy(model, tokenizer, p) for p in PROMPTS[:2]] + ["\u2603 never", "\u2603 no"]
    tasks = write_tasks(tmp_path / "tasks", answers)
    run = tmp_path / "run"
    trained = CliRunner().invoke(app, ["run", "--no-progress", "--model", "tiny", "--backend",
                                       "cpu", "--max-steps", "1", "--lr", "1e-9",
                                       "--output", str(run)])
    assert trained.exit_code == 0, trained.output
    # lr 1e-9 for one step: final/ is the tiny model to float32 precision, so the greedy
    # answers above are its answers too (checked below through exact_match = 0.5).
    result = CliRunner().invoke(app, ["eval", "--model", str(run), "--tasks",
                                      str(tasks / "toy_gen.yaml"), "--backend", "cpu"])
    assert result.exit_code == 0, result.output
    assert "exact_match" in result.output and "0.5000" in result.output
    saved = json.loads((run / "eval-tasks" / "final.json").read_text())
    assert saved["metrics"]["toy_gen"]["exact_match"] == {
        "value": 0.5, "stderr": pytest.approx(math.sqrt(0.25 / 3))}
    assert saved["results"]["toy_gen"]["exact_match,none"] == 0.5
    assert saved["n-samples"]["toy_gen"] == {"original": 4, "effective": 4}
    assert {"configs", "versions", "lm_eval_version", "model", "backend", "dtype"} <= set(saved)
    again = CliRunner().invoke(app, ["eval", "--model", str(run / "final"), "--tasks",
                                     str(tasks / "toy_mc.yaml"), "--limit", "2"])
    assert again.exit_code == 0, again.output
    saved = json.loads((run / "eval-tasks" / "final.json").read_text())
    assert set(saved["metrics"]) == {"toy_gen", "toy_mc"}
    assert saved["n-samples"]["toy_mc"]["effective"] == 2


def test_several_models_side_by_side(tmp_path, app):
    """--model twice: one table, a column per model, each cell "value ± stderr"."""
    tasks = write_tasks(tmp_path / "tasks")
    other = tmp_path / "other.json"
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--model", "tiny",
                                      "--tasks", str(tasks), "--limit", "4"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "toy_mc" in line)
    assert row.count("±") == 2
    assert not other.exists()


def test_flatten_names_metrics_without_the_default_filter():
    """"acc,none" -> acc; "exact_match,strict-match" -> exact_match_strict-match; a stderr the
    harness did not compute ("N/A") -> None, and no _stderr key in metrics.jsonl."""
    flat = harness_tasks.flatten({"results": {"t": {
        "alias": "t", "acc,none": 1.0, "acc_stderr,none": "N/A",
        "exact_match,strict-match": 0.5, "exact_match_stderr,strict-match": 0.25}}})
    assert flat == {"t": {"acc": {"value": 1.0, "stderr": None},
                          "exact_match_strict-match": {"value": 0.5, "stderr": 0.25}}}
    assert harness_tasks.metric_record(flat) == {
        "eval/tasks/t/acc": 1.0, "eval/tasks/t/exact_match_strict-match": 0.5,
        "eval/tasks/t/exact_match_strict-match_stderr": 0.25}


@pytest.mark.parametrize("command", ["run", "sft"])
def test_training_scores_the_tasks_into_metrics_jsonl(tmp_path, app, command):
    """`dpo run` (and `dpo sft`) `--eval-tasks DIR --eval-tasks-steps 2 --max-steps 3`: records
    at steps 0 (the baseline), 2 and 3 (the end), each with eval/tasks/toy_mc/acc and its
    stderr, the harness's results in OUTPUT/eval-tasks/step-N.json; the step-0 accuracy is the
    tiny model's own."""
    tasks = write_tasks(tmp_path / "tasks")
    expected, _ = hand_accuracy()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [command, "--no-progress", "--model", "tiny", "--backend",
                                      "cpu", "--max-steps", "3", "--eval-tasks", str(tasks),
                                      "--eval-tasks-steps", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval/tasks/toy_mc/acc" in r]
    assert [r["step"] for r in scored] == [0, 2, 3]
    assert all(set(r) == {"step", "eval/tasks/toy_mc/acc", "eval/tasks/toy_mc/acc_stderr"}
               for r in scored)
    assert scored[0]["eval/tasks/toy_mc/acc"] == pytest.approx(expected)
    assert sorted(p.name for p in (out / "eval-tasks").iterdir()) == [
        "step-0.json", "step-2.json", "step-3.json"]
    assert json.loads(Path(out / "run.json").read_text())["config"]["eval_tasks"] == str(tasks)


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output
    assert "Traceback" not in result.output
    return errors[0]


def test_missing_extra_is_one_line_before_anything_runs(tmp_path, app, monkeypatch):
    """Without lm-eval: `dpo eval --tasks` and `dpo run --eval-tasks` exit 2 with one line
    naming dpo-trainer[eval]; the run wrote nothing."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--tasks", "hellaswag"])
    assert result.exit_code == 2
    assert "pip install 'dpo-trainer[eval]'" in one_error_line(result)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--no-progress", "--model", "tiny", "--max-steps",
                                      "1", "--eval-tasks", "hellaswag", "--output", str(out)])
    assert result.exit_code == 2
    assert "--eval-tasks needs EleutherAI's lm-eval harness" in one_error_line(result)
    assert not out.exists()


def test_bad_task_input_is_one_line(tmp_path, app):
    """An unknown task name, a missing directory, a hub task while offline, --data and --tasks
    both missing, several models with --data, options of --tasks without it, and --nproc with
    --eval-tasks: each one line, exit 2."""
    tasks = write_tasks(tmp_path / "tasks")
    hub, empty = tmp_path / "hub", tmp_path / "empty"
    hub.mkdir()
    empty.mkdir()
    (hub / "h.yaml").write_text((tasks / "toy_mc.yaml").read_text().replace(
        "task: toy_mc", "task: toy_hub").replace("dataset_path: json",
                                                 "dataset_path: no-such-org/no-such-set"))
    cases = {
        ("eval", "--model", "tiny", "--tasks", f"{tasks},toy_mcc"): "not a task the lm-eval",
        ("eval", "--model", "tiny", "--tasks", str(tmp_path / "nowhere")): "no such directory",
        ("eval", "--model", "tiny", "--tasks", str(empty)): "no task YAML file there",
        ("eval", "--model", "tiny", "--tasks", str(hub)): "switched off here",
        ("eval", "--model", "tiny"): "give --data (held-out pairs) or --tasks",
        ("eval", "--model", "tiny", "--model", "tiny", "--data", "x.jsonl"): "take one model",
        ("eval", "--model", "tiny", "--data", "x.jsonl", "--limit", "2"): "an option of --tasks",
        ("run", "--model", "tiny", "--eval-tasks-steps", "2"): "give --eval-tasks too",
        ("run", "--model", "tiny", "--nproc", "2", "--eval-tasks", str(tasks)): "one process",
    }
    for args, expected in cases.items():
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 2, (args, result.output)
        assert expected in one_error_line(result), args
    assert not (tmp_path / "out").exists()


def test_the_shipped_format_example_runs(app, monkeypatch):
    """examples/tasks (run from the repository root, as its YAML files say): a multiple-choice
    task and a generate_until task whose regex filter names its metric exact_match_strip."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--tasks", "examples/tasks",
                                      "--limit", "3", "--json"])
    assert result.exit_code == 0, result.output
    (scores,) = json.loads(result.output)["tasks"]
    assert set(scores["metrics"]) == {"arithmetic_mc", "arithmetic_gen"}
    assert set(scores["metrics"]["arithmetic_gen"]) == {"exact_match_strip"}
    assert scores["n-samples"]["arithmetic_mc"] == {"original": 20, "effective": 3}


@pytest.mark.parametrize("command", ["run", "sft", "eval"])
def test_help_names_the_extra_with_its_brackets(app, command):
    """The help of --tasks / --eval-tasks says `pip install 'dpo-trainer[eval]'` (brackets
    escaped, or rich's help would take [eval] for markup and drop it)."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "'dpo-trainer[eval]'" in result.output
