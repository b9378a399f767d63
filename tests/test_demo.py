"""The built-in demo dataset (dpo.core.training.demo): deterministic, disjoint splits, right answers
chosen, no cue outside the question, and loadable by the project's own data path."""

from __future__ import annotations

import hashlib
import random
import re

import pytest

from dpo.core.training import demo
from dpo.core.data.reading import load_pairs
from dpo.core.data.tokenization import tokenize_pairs
from dpo.core.interfaces.plugins import collect, get_plugin_manager
from dpo.core.model.tiny import build_tiny_tokenizer


def user_text(record: dict) -> str:
    return record["prompt"][-1]["content"]


def answer(record: dict, side: str) -> str:
    (message,) = record[side]
    assert message["role"] == "assistant"
    return message["content"]


def numbers_in(question: str) -> tuple[int, int]:
    first, second = re.findall(r"\d+", question)
    return int(first), int(second)


# -- determinism -------------------------------------------------------------------------------

def test_same_records_on_every_call_whatever_the_global_random_state():
    random.seed(0)
    first = demo.demo_records("train")
    random.seed(12345)
    random.random()
    state = random.getstate()
    second = demo.demo_records("train")
    assert first == second
    assert demo.demo_records("eval") == demo.demo_records("eval")
    assert random.getstate() == state  # the generator is private: global state is untouched


def test_golden_records():
    """Derived by hand from the rules in ``questions``, given the seeded shuffle's order (the
    first eval pairs are (93, 94), (82, 84), (10, 61), (17, 43); train starts at pair 1000 of the
    shuffle: (55, 58), (82, 89), (47, 96), (40, 78)):

    * eval question 0: even index -> "larger"; 0 // 2 = 0 is even -> smaller number first:
      "Which number is larger: 93 or 94?", chosen 94, rejected 93.
    * train question 3: odd index -> "smaller"; 3 // 2 = 1 is odd -> larger number first:
      "Which number is smaller: 78 or 40?", chosen 40, rejected 78.
    """
    system = {"role": "system", "content": "Answer with the number only."}
    assert demo.demo_records("eval", 1) == [{
        "prompt": [system, {"role": "user", "content": "Which number is larger: 93 or 94?"}],
        "chosen": [{"role": "assistant", "content": "94"}],
        "rejected": [{"role": "assistant", "content": "93"}],
    }]
    assert demo.demo_records("train", 4)[3] == {
        "prompt": [system, {"role": "user", "content": "Which number is smaller: 78 or 40?"}],
        "chosen": [{"role": "assistant", "content": "40"}],
        "rejected": [{"role": "assistant", "content": "78"}],
    }
    texts = [q.text for q in demo.questions("eval", 4)]
    assert texts == ["Which number is larger: 93 or 94?", "Which number is smaller: 82 or 84?",
                     "Which number is larger: 61 or 10?", "Which number is smaller: 43 or 17?"]


def test_written_files_are_byte_identical_everywhere(tmp_path):
    """Pins the whole generator (shuffle, rules, wording, JSON layout): any change shows here."""
    train_path, eval_path = demo.write_demo(tmp_path, train_size=320, eval_size=64)
    assert (train_path.name, eval_path.name) == ("demo-train.jsonl", "demo-eval.jsonl")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (train_path, eval_path)}
    assert digest == {
        "demo-train.jsonl": "d1463784c4758d049f2efe4e4923f3e7a8b7cb0562c4d573ba3f96f2562480e4",
        "demo-eval.jsonl": "e9f9116c0d224ed4497cd1851d293a154b50ac43fdda32d7a02797fab440ccfc",
    }


def test_default_sizes_and_prefixes():
    assert len(demo.demo_records("train")) == demo.TRAIN_SIZE
    assert len(demo.demo_records("eval")) == demo.EVAL_SIZE
    assert demo.demo_records("train", 100) == demo.demo_records("train", 200)[:100]


@pytest.mark.parametrize(("split", "n"), [("test", None), ("train", 0), ("eval", 1001),
                                          ("train", 3006)])
def test_bad_split_or_size_is_refused(split, n):
    with pytest.raises(ValueError):
        demo.demo_records(split, n)


# -- splits ------------------------------------------------------------------------------------

def test_splits_never_share_a_pair_of_numbers():
    train = {frozenset(numbers_in(q.text)) for q in demo.questions("train", 3005)}
    held = {frozenset(numbers_in(q.text)) for q in demo.questions("eval", 1000)}
    assert len(train) == 3005 and len(held) == 1000  # no pair repeats within a split either
    assert not train & held
    assert len(train | held) == 90 * 89 // 2  # together: every pair of distinct two-digit numbers


# -- correctness -------------------------------------------------------------------------------

def test_the_checker_itself():
    assert demo.right_answer("Which number is larger: 59 or 63?") == 63
    assert demo.right_answer("Which number is smaller: 59 or 63?") == 59
    assert demo.is_right("Which number is smaller: 70 or 17?", " 17\n")
    assert not demo.is_right("Which number is smaller: 70 or 17?", "70")
    assert not demo.is_right("Which number is smaller: 70 or 17?", "17.5")
    with pytest.raises(ValueError):
        demo.right_answer("What is 2 + 2?")


@pytest.mark.parametrize("split", demo.SPLITS)
def test_chosen_is_right_and_rejected_is_the_other_number(split):
    for record in demo.demo_records(split, 1000):
        question = user_text(record)
        chosen, rejected = answer(record, "chosen"), answer(record, "rejected")
        assert demo.is_right(question, chosen)
        assert not demo.is_right(question, rejected)
        assert sorted(numbers_in(question)) == sorted([int(chosen), int(rejected)])


# -- nothing but the question tells chosen from rejected ----------------------------------------

@pytest.mark.parametrize("split", demo.SPLITS)
def test_same_format_and_length(split):
    for record in demo.demo_records(split, 1000):
        chosen, rejected = answer(record, "chosen"), answer(record, "rejected")
        assert re.fullmatch(r"[1-9]\d", chosen) and re.fullmatch(r"[1-9]\d", rejected)
        assert record["prompt"][0] == {"role": "system", "content": demo.SYSTEM_PROMPT}


@pytest.mark.parametrize(("split", "n"), [("train", None), ("eval", None), ("eval", 1000)])
def test_no_rule_that_ignores_the_question_beats_chance(split, n):
    """Preferring the larger number, the smaller, the first-mentioned or the second-mentioned
    is right in exactly half the records: the question word must be read."""
    records = demo.demo_records(split, n)
    pairs = [(numbers_in(user_text(r)), int(answer(r, "chosen"))) for r in records]
    rules = {"larger": lambda a, b: max(a, b), "smaller": lambda a, b: min(a, b),
             "first": lambda a, b: a, "second": lambda a, b: b}
    for name, rule in rules.items():
        hits = sum(rule(a, b) == chosen for (a, b), chosen in pairs)
        assert hits * 2 == len(pairs), name


def test_answer_digits_are_spread_alike():
    """The chosen and rejected answers use the same digits about equally often, so no digit is
    a cue of its own."""
    records = demo.demo_records("train")
    for position in (0, 1):
        for digit in "0123456789":
            chosen = sum(answer(r, "chosen")[position] == digit for r in records)
            rejected = sum(answer(r, "rejected")[position] == digit for r in records)
            assert abs(chosen - rejected) <= 0.05 * len(records), (position, digit)


# -- the project's data path -------------------------------------------------------------------

def test_files_load_and_tokenize_through_the_project_data_path(tmp_path):
    train_path, eval_path = demo.write_demo(tmp_path)
    formats = collect(get_plugin_manager(load_entrypoints=False)).formats
    tokenizer = build_tiny_tokenizer()
    for path, split in ((train_path, "train"), (eval_path, "eval")):
        records = demo.demo_records(split)
        pairs = load_pairs(path, formats)
        assert len(pairs) == len(records)
        for sourced, record in zip(pairs, records):
            assert (sourced.pair.prompt, sourced.pair.chosen, sourced.pair.rejected) == (
                record["prompt"], record["chosen"], record["rejected"])
        tokenized, stats = tokenize_pairs(tokenizer, pairs, 256, 192)
        assert stats.kept == len(records) and stats.prompts_truncated == 0
        for pair in tokenized:
            # Two digits and the EOS on each side.
            assert len(pair.chosen_ids) == len(pair.rejected_ids) == 3
            assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tokenizer.eos_token_id
