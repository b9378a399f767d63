"""`dpo demo`: SFT, then DPO from the SFT model, then base, SFT and DPO compared on held-out
questions (ranking and answer accuracy), end to end on the tiny model; the scoring on
hand-made replies; and the output rules (nothing of the user's replaced, every refusal before
any training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.interfaces.plugins import collect, get_plugin_manager
from dpo.core.model.loading import load_model
from dpo.core.training import demo, study
from test_cli import assert_one_line_error

SMALL = ("--model", "tiny", "--backend", "cpu", "--steps", "2", "--held-out", "6",
         "--no-progress")


def invoke(*args: str):
    return CliRunner().invoke(make_app(get_plugin_manager()), ["demo", *args])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    """A complete tiny study: its directory and what the command printed."""
    out = tmp_path_factory.mktemp("study") / "out"
    result = invoke("--output", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_the_study_prints_one_table_and_writes_the_comparison(finished):
    out, printed = finished
    assert "ranking accuracy" in printed and "answer accuracy" in printed
    for row in ("base (tiny)", f"sft ({out / 'sft' / 'final'})", f"dpo ({out / 'dpo' / 'final'})"):
        assert row in printed
    assert "greedy replies" in printed and "Which number is larger: 93 or 94?" in printed
    written = json.loads((out / study.COMPARISON_FILE).read_text())
    assert written["kind"] == study.KIND and written["held_out"] == 6
    assert [m["name"] for m in written["models"]] == ["base", "sft", "dpo"]
    assert [m["model"] for m in written["models"]] == [
        "tiny", str(out / "sft" / "final"), str(out / "dpo" / "final")]
    questions = written["questions"]
    assert [q["question"] for q in questions] == [q.text for q in demo.questions("eval", 6)]
    assert [q["answer"] for q in questions] == [q.answer for q in demo.questions("eval", 6)]
    for model in written["models"]:
        for key in ("ranking_accuracy", "answer_accuracy", "answer_form"):
            assert 0 <= model[key] <= 1
        replies = [q["replies"][model["name"]] for q in questions]
        # The answer accuracy is the checker's verdict on the replies written beside it.
        texts = [q["question"] for q in questions]
        assert model["answer_accuracy"] == study.answer_accuracy(texts, replies)
        assert model["answer_form"] == study.answer_form(texts, replies)
        assert model["answer_accuracy"] <= model["answer_form"]
        assert f"{model['ranking_accuracy']:.3f}" in printed


def test_sft_then_dpo_from_the_sft_model(finished):
    out, _ = finished
    sft = json.loads((out / "sft" / "run.json").read_text())
    dpo = json.loads((out / "dpo" / "run.json").read_text())
    assert sft["config"]["objective"] == "sft" and dpo["config"]["objective"] == "dpo"
    assert sft["config"]["data"] == dpo["config"]["data"] == "demo"
    assert sft["config"]["model"] == "tiny"
    # DPO starts from the SFT model, which is also its reference (no other reference named).
    assert dpo["config"]["model"] == str(out / "sft" / "final")
    assert dpo["config"]["ref_model"] is None
    for record in (sft, dpo):
        assert record["status"].startswith("completed") and record["config"]["max_steps"] == 2
    # The demo's presets fill what the study does not set.
    assert sft["config"]["lr"] == demo.SFT_DEMO_PRESET["lr"]
    assert dpo["config"]["lr"] == demo.DPO_AFTER_SFT_LR  # gentler from the SFT model
    assert dpo["config"]["batch_size"] == demo.DEMO_PRESET["batch_size"]


def test_answer_accuracy_on_hand_made_replies():
    texts = [q.text for q in demo.questions("eval", 4)]
    # larger of 93/94, smaller of 82/84, larger of 61/10, smaller of 43/17
    assert [demo.right_answer(t) for t in texts] == [94, 82, 61, 17]
    assert study.answer_accuracy(texts, ["94", " 82\n", "61", "17"]) == 1.0
    # A right number in a sentence, the wrong number, a number with a dot: not the answer.
    assert study.answer_accuracy(texts, ["The answer is 94", "84", "61.", "17"]) == 0.25
    assert study.answer_accuracy(texts, ["", "", "", ""]) == 0.0
    # Form: one of the question's two numbers alone, right or wrong.
    assert study.answer_form(texts, ["The answer is 94", "84", "61.", "17"]) == 0.5
    assert study.answer_form(texts, ["93", "62", " 61 ", "43"]) == 0.75
    with pytest.raises(ValueError, match="4 questions but 3 replies"):
        study.answer_accuracy(texts, ["94", "82", "61"])
    with pytest.raises(ValueError, match="not a demo question"):
        study.answer_accuracy(["What is 2 + 2?"], ["4"])


def test_ranking_accuracy_counts_strict_wins_only():
    chosen = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    rejected = torch.tensor([-2.0, -1.0, -3.0, -5.0])
    assert study.ranking_accuracy(chosen, rejected) == 0.5  # a tie ranks nothing
    with pytest.raises(ValueError):
        study.ranking_accuracy(chosen, rejected[:3])


def test_replies_are_what_each_prompt_gets_alone():
    """Prompts of several lengths: generated together by length, each reply is the one the
    prompt gets on its own."""
    model, tokenizer = load_model("tiny", 42)
    model.eval()
    prompts = [tuple(tokenizer(text)["input_ids"]) for text in
               ("Which number", "Which number is larger", "Hi", "Which number is bigger", "Hi")]
    assert len({len(p) for p in prompts}) >= 3
    together = study.greedy_replies(model, tokenizer, prompts, torch.device("cpu"))
    alone = [study.greedy_replies(model, tokenizer, [p], torch.device("cpu"))[0] for p in prompts]
    assert together == alone
    assert together[2] == together[4]


def test_held_out_pairs_are_the_demo_runs_own():
    questions, pairs = study.held_out(3, collect(get_plugin_manager()))
    assert [q.record() for q in questions] == demo.demo_records("eval", 3)
    assert [p.pair.chosen for p in pairs] == [r["chosen"] for r in demo.demo_records("eval", 3)]


def tree(path: Path) -> dict[str, int | None]:
    """Every entry under ``path``, with each file's modification time (a directory's changes
    when a writability probe comes and goes in it)."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns if p.is_file() else None
            for p in sorted(path.rglob("*"))}


def test_a_second_study_needs_overwrite_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "out"
    assert invoke("--output", str(out), *SMALL).exit_code == 0
    before = tree(out)
    result = invoke("--output", str(out), *SMALL)
    assert_one_line_error(result, 2, str(out / "sft"), "--overwrite")
    assert tree(out) == before  # refused before anything was written

    notes = out / "sft" / "notes.txt"
    notes.write_text("mine")
    result = invoke("--output", str(out), *SMALL, "--overwrite")
    assert result.exit_code == 0, result.output
    assert notes.read_text() == "mine"
    assert (out / "dpo" / "final").is_dir()
    assert json.loads((out / study.COMPARISON_FILE).read_text())["kind"] == study.KIND


def test_overwrite_leaves_what_dpo_did_not_write(tmp_path):
    out = tmp_path / "out"
    (out / "dpo").mkdir(parents=True)
    (out / "dpo" / "weights.bin").write_text("not a run")
    before = tree(out)
    result = invoke("--output", str(out), *SMALL, "--overwrite")
    assert_one_line_error(result, 2, str(out / "dpo"), "not a dpo run directory")
    assert tree(out) == before  # the SFT stage never started

    (out / "dpo" / "weights.bin").unlink()
    (out / study.COMPARISON_FILE).write_text('{"my": "numbers"}')
    result = invoke("--output", str(out), *SMALL, "--overwrite")
    assert_one_line_error(result, 2, study.COMPARISON_FILE, "not a comparison written by")
    assert (out / study.COMPARISON_FILE).read_text() == '{"my": "numbers"}'
    assert not (out / "sft").exists()


def test_a_run_directory_is_not_a_study_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text('{"config": {}}')
    result = invoke("--output", str(out), *SMALL)
    assert_one_line_error(result, 2, "a run directory of `dpo run`")
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


@pytest.mark.parametrize("args, fragments", [
    (("--steps", "0"), ("--steps 0", "at least 1")),
    (("--held-out", "0"), ("--held-out 0", "1 to 1000")),
    (("--held-out", "1001"), ("--held-out 1001",)),
    (("--backend", "tpu9"), ("unknown backend 'tpu9'",)),
    (("--model", "no/such-model.gguf"), ("no/such-model.gguf",)),
    (("--steps", "two"), ("--steps",)),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragments):
    out = tmp_path / "out"
    result = invoke("--output", str(out), "--model", "tiny", "--no-progress", *args)
    assert_one_line_error(result, 2, *fragments)
    assert not out.exists() or not any(out.rglob("*"))
