"""Reading, format detection, tokenisation, truncation, batching and the batch order."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from dpo.core.interfaces.data_format import DataFormat, PreferencePair, UnusableRecord
from dpo.core.data.batching import Batch, BatchSampler, collate
from dpo.core.data.reading import SourcedPair, load_pairs, read_records, split_eval
from dpo.core.data.stats import DataStats
from dpo.core.data.tokenization import TokenizedPair, tokenize_pairs
from dpo.core.interfaces.errors import DataError, UnknownNameError, UsageError
from dpo.core.interfaces.registry import Registry
from dpo.core.model.tiny import build_tiny_tokenizer
from dpo.plugins.formats.preference import PreferenceFormat


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Objects are written as JSON, strings as they are (blank or broken lines)."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def pair(prompt: Any = "p", chosen: Any = "c", rejected: Any = "r") -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def sourced(prompt: Any, chosen: Any, rejected: Any, line: int = 1) -> SourcedPair:
    return SourcedPair(PreferencePair(prompt, chosen, rejected), "data.jsonl", line)


class QuestionFormat(DataFormat):
    """A second format for detection tests: question/good/bad."""

    name = "question"

    @classmethod
    def detect(cls, record):
        return "question" in record

    def parse(self, record):
        return PreferencePair(record["question"], record["good"], record["bad"])


class AnyFormat(DataFormat):
    """Accepts every record; sorts before 'preference', so it wins auto-detection."""

    name = "any"

    @classmethod
    def detect(cls, record):
        return True

    def parse(self, record):
        return PreferencePair("any", "a", "b")


def registry(*classes: type[DataFormat]) -> Registry[DataFormat]:
    formats: Registry[DataFormat] = Registry("data format", DataFormat)
    for cls in classes:
        formats.add(cls, provider="tests")
    return formats


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


# -- read_records ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz"])
def test_read_records_numbers_lines_and_skips_blanks(tmp_path, name):
    path = write_jsonl(tmp_path / name, [{"a": 1}, "", "   ", {"b": "ü"}])
    assert list(read_records(path)) == [(1, {"a": 1}), (4, {"b": "ü"})]


def test_read_records_streams_up_to_a_bad_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}, "", '{"b": '])
    records = read_records(path)
    assert next(records) == (1, {"a": 1})
    with pytest.raises(DataError) as info:
        next(records)
    assert str(info.value).startswith(f"{path}:3: invalid JSON")
    assert "one JSON object" in str(info.value)
    assert (info.value.path, info.value.line) == (str(path), 3)


def test_read_records_refuses_a_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl.gz", [{"a": 1}, [1, 2]])
    with pytest.raises(DataError, match=r"d\.jsonl\.gz:2: expected a JSON object, got list"):
        list(read_records(path))


@pytest.fixture
def no_datasets(monkeypatch):
    """The optional ``datasets`` package as if not installed (None in sys.modules: ImportError)."""
    monkeypatch.setitem(sys.modules, "datasets", None)


def test_read_records_names_a_missing_file_at_the_call(tmp_path, no_datasets):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        read_records(missing)  # no iteration needed
    assert str(info.value) == (f"{missing}: no such file; check the path given to --data (or "
                               "install dpo-trainer[datasets] to read a hub dataset by name)")


def test_read_records_names_the_line_with_bad_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8"):
        list(read_records(path))


def test_read_records_reports_a_truncated_gzip(tmp_path):
    records = [pair(prompt="x" * 5000, chosen=str(i)) for i in range(20)]
    whole = write_jsonl(tmp_path / "whole.jsonl.gz", records)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: damaged gzip data .*truncated or "
                       r"corrupt: copy or compress it again$"):
        list(read_records(cut))


def damaged(whole: bytes, at: int) -> bytes:
    """``whole`` with the byte at ``at`` inverted."""
    return whole[:at] + bytes([whole[at] ^ 0xFF]) + whole[at + 1:]


@pytest.mark.parametrize("at, reason", [
    (12, "Error -3 while decompressing data"),  # the first deflate block's header: zlib refuses it
    (-8, "CRC check failed"),  # the stored checksum
    (700, "CRC check failed"),  # mid-stream: decompresses to wrong lines, then the checksum
])
def test_read_records_reports_a_damaged_gzip_not_a_bad_line(tmp_path, at, reason):
    """A flipped byte in compressed data often decompresses to garbage lines long before the
    checksum at the end is read (the third case: an invalid JSON line 90-odd): the error names
    the damage, never a line's JSON."""
    text = "".join(json.dumps(pair(prompt=f"Say {i}. ", chosen=str(i))) + "\n" for i in range(200))
    whole = gzip.compress(text.encode(), mtime=0)  # 10 header bytes, no file name
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(damaged(whole, at))
    with pytest.raises(DataError) as info:
        list(read_records(path))
    message = str(info.value)
    assert message.startswith(f"{path}: damaged gzip data") and reason in message, message
    assert "copy or compress it again" in message and "JSON" not in message


def test_read_records_refuses_plain_text_named_gz(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", [pair()]).rename(tmp_path / "plain.jsonl.gz")
    with pytest.raises(DataError) as info:
        list(read_records(path))
    assert str(info.value) == (f"{path}: not gzip data, though its name ends in .gz; compress "
                               "it with gzip, or drop the .gz from its name")


def test_read_records_names_the_line_of_bad_utf8_inside_a_sound_gzip(tmp_path):
    path = tmp_path / "latin.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"a": 1}\n{"a": "caf\xe9"}\n'))
    with pytest.raises(DataError, match=r"latin\.jsonl\.gz:2: not UTF-8 text; save the file as "
                       "UTF-8"):
        list(read_records(path))


# -- hub datasets (a fake ``datasets`` module) --------------------------------------------------

@pytest.fixture
def hub(monkeypatch):
    """A stand-in for the ``datasets`` package: ``load_dataset`` records its calls and returns
    the rows of ``hub.rows[(name, split)]`` (a missing entry fails as the real one does)."""
    fake = types.ModuleType("datasets")
    fake.calls, fake.rows = [], {}

    def load_dataset(name, split):
        fake.calls.append((name, split))
        if (name, split) not in fake.rows:
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be "
                                    "accessed.\nMore lines.")
        return fake.rows[(name, split)]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return fake


def test_a_missing_path_is_read_as_a_hub_dataset_with_rows_numbered_from_1(hub):
    hub.rows[("org/pairs", "train")] = [pair("p1", "c1", "r1"), pair("p2", "c2", "r2")]
    hub.rows[("org/pairs", "test[:1]")] = [pair("p3", "c3", "r3")]
    pairs = load_pairs("org/pairs", registry(PreferenceFormat))
    assert pairs == [SourcedPair(PreferencePair("p1", "c1", "r1"), "org/pairs", 1),
                     SourcedPair(PreferencePair("p2", "c2", "r2"), "org/pairs", 2)]
    assert list(read_records("org/pairs:test[:1]")) == [(1, pair("p3", "c3", "r3"))]
    assert hub.calls == [("org/pairs", "train"), ("org/pairs", "test[:1]")]


def test_hub_rows_name_their_row_in_errors(hub):
    hub.rows[("org/pairs", "train")] = [pair(), pair(chosen=3)]
    with pytest.raises(DataError) as info:
        load_pairs("org/pairs", registry(PreferenceFormat))
    assert str(info.value) == ("org/pairs:2: preference format: field 'chosen' must be a string, "
                               "got number")


def test_a_dataset_that_cannot_be_loaded_is_one_line(hub):
    with pytest.raises(DataError) as info:
        read_records("org/nope:dev")
    assert str(info.value) == (
        "org/nope:dev: no such file, and no Hugging Face dataset 'org/nope' with split 'dev' "
        "could be loaded (Dataset 'org/nope' doesn't exist on the Hub or cannot be accessed.); "
        "check the path or the dataset name")


@pytest.mark.parametrize("name", ["data/train.jsonl", "pairs.jsonl.gz", "/abs/pairs"])
def test_a_missing_local_file_is_not_looked_up_on_the_hub(hub, name):
    with pytest.raises(DataError) as info:
        read_records(name)
    assert str(info.value) == f"{name}: no such file; check the path given to --data"
    assert hub.calls == []


# -- load_pairs --------------------------------------------------------------------------------

def test_load_pairs_detects_the_format_and_keeps_the_source(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair("p1", "c1", "r1"), "", pair("p2", "c2", "r2")])
    pairs = load_pairs(path, registry(PreferenceFormat, QuestionFormat))
    assert pairs == [SourcedPair(PreferencePair("p1", "c1", "r1"), str(path), 1),
                     SourcedPair(PreferencePair("p2", "c2", "r2"), str(path), 3)]


def test_detection_takes_the_first_format_by_name_and_forcing_overrides_it(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair("p1", "c1", "r1")])
    formats = registry(PreferenceFormat, AnyFormat)
    assert load_pairs(path, formats)[0].pair == PreferencePair("any", "a", "b")
    assert load_pairs(path, formats, "preference")[0].pair == PreferencePair("p1", "c1", "r1")


def test_detection_uses_the_first_record_for_the_whole_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "good": "g", "bad": "b"}, pair()])
    with pytest.raises(DataError, match=r"d\.jsonl:2: question format: missing field 'question'"):
        load_pairs(path, registry(PreferenceFormat, QuestionFormat))


def test_an_unknown_forced_format_lists_the_installed_ones(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair()])
    with pytest.raises(UnknownNameError) as info:
        load_pairs(path, registry(PreferenceFormat, QuestionFormat), "sharegpt")
    assert str(info.value) == "unknown data format 'sharegpt'; installed: preference, question"


def test_an_unrecognised_record_lists_the_installed_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", {"text": "t", "label": 1}])
    with pytest.raises(DataError) as info:
        load_pairs(path, registry(PreferenceFormat, QuestionFormat))
    message = str(info.value)
    assert message.startswith(f"{path}:2: no installed data format recognises this record")
    assert "(keys: label, text)" in message and "installed: preference, question" in message


def test_a_parse_error_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair(), pair(chosen=["x"])])
    with pytest.raises(DataError) as info:
        load_pairs(path, registry(PreferenceFormat))
    assert str(info.value) == (f"{path}:2: preference format: field 'chosen' must be a string, "
                               "got list")


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_an_empty_file_is_an_error(tmp_path, lines):
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match="no records"):
        load_pairs(path, registry(PreferenceFormat))


class PickyFormat(DataFormat):
    """question/good/bad; a record without "good" is unusable, with a non-string "good"
    malformed."""

    name = "picky"

    @classmethod
    def detect(cls, record):
        return "question" in record

    def parse(self, record):
        if "good" not in record:
            raise UnusableRecord("no_good_answer", "there is no good answer")
        if not isinstance(record["good"], str):
            raise ValueError("field 'good' must be a string")
        if record["good"] == record["bad"]:
            raise UnusableRecord("identical", "good and bad are the same")
        return PreferencePair(record["question"], record["good"], record["bad"])


PICKY_LINES = [
    {"question": "q1", "good": "g", "bad": "b"},
    {"question": "q2", "bad": "b"},
    {"question": "q3", "good": "x", "bad": "x"},
    {"question": "q4", "bad": "b"},
    {"question": "q5", "good": "g", "bad": "b"},
]


def test_unusable_record_is_public_a_value_error_and_checks_its_reason():
    import pickle

    import dpo

    exc = dpo.UnusableRecord("no_good_answer", "there is no good answer")
    assert isinstance(exc, ValueError) and exc.reason == "no_good_answer"
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.reason, str(copy)) == ("no_good_answer", "there is no good answer")
    with pytest.raises(ValueError, match="must be lower_case_words"):
        dpo.UnusableRecord("No good answer", "m")


def test_unusable_records_are_dropped_and_counted_per_reason(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", PICKY_LINES)
    stats = DataStats()
    pairs = load_pairs(path, registry(PickyFormat), stats=stats)
    assert [p.line for p in pairs] == [1, 5]
    assert stats.drops() == {"identical": 1, "no_good_answer": 2}
    assert stats.as_dict()["dropped_no_good_answer"] == 2 and stats.read == 0
    assert load_pairs(path, registry(PickyFormat)) == pairs  # counting is optional


def test_strict_stops_at_the_first_unusable_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", PICKY_LINES)
    with pytest.raises(DataError) as info:
        load_pairs(path, registry(PickyFormat), strict=True)
    assert str(info.value) == (f"{path}:2: picky format: there is no good answer; fix or remove "
                               "the record, or run without --strict")


def test_a_malformed_record_is_an_error_even_without_strict(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [*PICKY_LINES, {"question": "q", "good": 1}])
    with pytest.raises(DataError, match=r"d\.jsonl:6: picky format: field 'good' must be a string$"):
        load_pairs(path, registry(PickyFormat))


def test_a_file_with_only_unusable_records_says_so(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [PICKY_LINES[1], PICKY_LINES[2]])
    with pytest.raises(DataError) as info:
        load_pairs(path, registry(PickyFormat))
    assert str(info.value) == (f"{path}: no usable records: all 2 were dropped (identical 1, "
                               "no_good_answer 1); run with --strict to stop at the first one and "
                               "see why")


def test_format_options_are_validated(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [pair()])
    with pytest.raises(UsageError, match="unknown option 'x'"):
        load_pairs(path, registry(PreferenceFormat), options={"x": "1"})


# -- tokenize_pairs: text ----------------------------------------------------------------------

def ids(text: str) -> list[int]:
    """The tiny tokenizer's ids for digits and capitals: one byte each, never merged."""
    return list(text.encode())


def test_text_pair_ids(tok):
    (tp,), stats = tokenize_pairs(tok, [sourced("Q: 12", " YES", " NO", line=7)], 64, 32)
    eos = tok.eos_token_id
    assert tp == TokenizedPair(tuple(ids("Q: 12")), (*ids(" YES"), eos), (*ids(" NO"), eos),
                               "data.jsonl:7")
    assert stats == DataStats(read=1, kept=1)


def test_the_boundary_is_exact_even_where_bpe_would_merge_across_it(tok):
    # " the" is one token; split as prompt " t" + completion "he" it must stay two pieces.
    (tp,), _ = tokenize_pairs(tok, [sourced(" t", "he", "HE")], 64, 32)
    assert tp.prompt_ids == tuple(tok(" t").input_ids)
    assert tp.chosen_ids == (*tok("he").input_ids, tok.eos_token_id)


def test_a_completion_already_ending_with_eos_gets_no_second_one(tok):
    (tp,), _ = tokenize_pairs(tok, [sourced("P", "A<|im_end|>", "B")], 64, 32)
    assert tp.chosen_ids == (ord("A"), tok.eos_token_id)


def test_truncation_is_explicit_symmetric_and_counted(tok):
    eos = tok.eos_token_id
    pairs = [
        sourced("0123456789", "ABCDEFGH", "XYZ", 1),  # prompt 10 -> 6; budget 6: chosen 9 -> 6
        sourced("01", "ABCDEFGHIJ", "KLMNOPQRST", 2),  # budget 10: both 11 -> 10
        sourced("0123", "ABCDEFGH1", "ABCDEFGH2", 3),  # budget 8: both cut to ABCDEFGH -> equal
        sourced("0", "A", "B", 4),  # fits
    ]
    out, stats = tokenize_pairs(tok, pairs, max_length=12, max_prompt_length=6)
    assert out == [
        TokenizedPair(tuple(ids("456789")), tuple(ids("ABCDEF")), (*ids("XYZ"), eos), "data.jsonl:1"),
        TokenizedPair(tuple(ids("01")), tuple(ids("ABCDEFGHIJ")), tuple(ids("KLMNOPQRST")),
                      "data.jsonl:2"),
        TokenizedPair(tuple(ids("0")), (ord("A"), eos), (ord("B"), eos), "data.jsonl:4"),
    ]
    assert stats.as_dict() == {
        "pairs_read": 4, "pairs_kept": 3, "prompts_truncated": 1, "completions_truncated": 5,
        "dropped_empty": 0, "dropped_empty_prompt": 0, "dropped_identical": 0,
        "dropped_identical_after_truncation": 1,
    }
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 12 for p in out)


def test_empty_and_identical_pairs_are_dropped_and_counted(tok):
    pairs = [sourced("P", "", "B"), sourced("P", "A", ""), sourced("P", "SAME", "SAME"),
             sourced("", "A", "B"), sourced("P", "A", "B", line=9)]
    out, stats = tokenize_pairs(tok, pairs, 64, 32)
    assert [p.source for p in out] == ["data.jsonl:9"]
    assert (stats.read, stats.kept, stats.dropped_empty, stats.dropped_identical,
            stats.dropped_empty_prompt) == (5, 1, 2, 1, 1)


@pytest.mark.parametrize("max_length, max_prompt_length", [(64, 64), (64, 100), (64, 0)])
def test_prompt_limit_must_leave_room_for_the_completion(tok, max_length, max_prompt_length):
    with pytest.raises(UsageError, match="max_prompt_length"):
        tokenize_pairs(tok, [sourced("P", "A", "B")], max_length, max_prompt_length)


# -- BOS handling ------------------------------------------------------------------------------

# ``bos_tok`` (conftest.py): the tiny tokenizer putting a BOS in front of every text itself.

def test_one_bos_in_front_of_the_prompt_only(bos_tok):
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    pairs = [sourced("AB", "C", "D"), sourced("<|endoftext|>AB", "C", "D")]
    out, _ = tokenize_pairs(bos_tok, pairs, 64, 32)
    for tp in out:
        assert tp.prompt_ids == (bos, 65, 66)
        assert tp.chosen_ids == (67, eos)


def test_prompt_truncation_keeps_the_bos(bos_tok):
    (tp,), stats = tokenize_pairs(bos_tok, [sourced("0123456789", "A", "B")], 12, 4)
    assert tp.prompt_ids == (bos_tok.bos_token_id, *ids("789"))
    assert stats.prompts_truncated == 1


def test_a_chat_template_that_writes_the_bos_gets_no_second_one(bos_tok):
    bos_tok.chat_template = "{{ bos_token }}" + bos_tok.chat_template
    (tp,), _ = tokenize_pairs(bos_tok, [sourced([{"role": "user", "content": "hi"}], "A", "B")], 64, 32)
    assert tp.prompt_ids[0] == bos_tok.bos_token_id
    assert tp.prompt_ids.count(bos_tok.bos_token_id) == 1


# -- chat messages -----------------------------------------------------------------------------

def test_chat_pairs_are_rendered_with_one_eos_at_the_boundary(tok):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chosen = [{"role": "assistant", "content": "hello"}]
    (tp,), _ = tokenize_pairs(tok, [sourced(prompt, chosen, "bye")], 64, 48)
    rendered = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tp.prompt_ids == tuple(tok(rendered).input_ids)
    eos = tok.eos_token_id
    assert tp.chosen_ids == (*tok("hello").input_ids, eos)  # the template's trailing "\n" is not trained
    assert tp.rejected_ids == (*tok("bye").input_ids, eos)  # a string completion is one assistant turn
    full = tok.apply_chat_template(prompt + chosen, tokenize=False)
    assert tok.decode(tp.prompt_ids + tp.chosen_ids) == full.rstrip("\n")


def test_chat_pairs_with_empty_content_are_dropped(tok):
    empty = [{"role": "assistant", "content": ""}]
    out, stats = tokenize_pairs(tok, [sourced("hi", empty, "B")], 64, 32)
    assert out == [] and stats.dropped_empty == 1


def test_a_template_whose_conversation_does_not_extend_the_prompt_is_refused():
    tokenizer = build_tiny_tokenizer()
    # Renders the message count first, so the prompt alone and the full conversation diverge.
    tokenizer.chat_template = ("{{ messages|length }}{% for m in messages %}{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    pairs = [sourced([{"role": "user", "content": "hi"}], "A", "B", line=5)]
    with pytest.raises(DataError, match=r"data\.jsonl:5: chat template: .* does not start with"):
        tokenize_pairs(tokenizer, pairs, 64, 32)


def test_chat_messages_need_a_chat_template():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"data\.jsonl:2: .*no chat template"):
        tokenize_pairs(tokenizer, [sourced("hi", [{"role": "assistant", "content": "A"}], "B", 2)],
                       64, 32)


def test_malformed_messages_name_the_field(tok):
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'rejected'"):
        tokenize_pairs(tok, [sourced("hi", [{"role": "assistant", "content": "A"}], [{"role": 1}])],
                       64, 32)


# -- collate -----------------------------------------------------------------------------------

E, P = 50, 99  # eos, pad
PAIRS = [TokenizedPair((1, 2, 3), (4, 5, E), (6, E), "a:1"),
         TokenizedPair((7,), (8, E), (9, 10, 11, E), "a:2")]


def test_collate_pads_right_and_masks_exactly_the_completions():
    batch = collate(PAIRS, pad_token_id=P)
    assert batch.input_ids.tolist() == [
        [1, 2, 3, 4, 5, E],  # chosen of pair 0
        [7, 8, E, P, P, P],  # chosen of pair 1
        [1, 2, 3, 6, E, P],  # rejected of pair 0
        [7, 9, 10, 11, E, P],  # rejected of pair 1
    ]
    assert batch.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0], [1] * 5 + [0], [1] * 5 + [0]]
    assert batch.completion_mask.tolist() == [
        [False, False, False, True, True, True],
        [False, True, True, False, False, False],
        [False, False, False, True, True, False],
        [False, True, True, True, True, False],
    ]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    assert batch.completion_mask.dtype == torch.bool
    assert (batch.num_pairs, batch.real_tokens, batch.padded_tokens) == (2, 19, 24)


@pytest.mark.parametrize("pad", [P, E])  # many models pad with the EOS id
def test_eos_is_the_last_masked_token_and_padding_is_never_masked(pad):
    batch = collate(PAIRS, pad_token_id=pad, pad_to_multiple_of=4)
    assert batch.input_ids.shape == (4, 8) and batch.padded_tokens == 32
    for row in range(4):
        masked = batch.completion_mask[row].nonzero().flatten().tolist()
        assert batch.input_ids[row, masked[-1]] == E
        assert masked == list(range(masked[0], masked[-1] + 1))  # one contiguous span
        assert not (batch.completion_mask[row] & (batch.attention_mask[row] == 0)).any()
    counts = batch.completion_mask.sum(1).tolist()
    assert counts == [len(p.chosen_ids) for p in PAIRS] + [len(p.rejected_ids) for p in PAIRS]


def test_batch_to_returns_a_new_batch_with_the_same_counts():
    batch = collate(PAIRS, pad_token_id=P)
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and moved is not batch
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.real_tokens == 19


# -- BatchSampler ------------------------------------------------------------------------------

LENGTHS = [(i * 37) % 101 + 1 for i in range(103)]


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


@pytest.mark.parametrize("group_by_length", [True, False])
def test_sampler_is_deterministic_and_covers_every_index_once(group_by_length):
    sampler = BatchSampler(LENGTHS, 8, seed=5, group_by_length=group_by_length)
    state = torch.get_rng_state()
    epoch0 = sampler.batches(0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used
    assert epoch0 == BatchSampler(LENGTHS, 8, seed=5, group_by_length=group_by_length).batches(0)
    assert epoch0 != sampler.batches(1)
    assert epoch0 != BatchSampler(LENGTHS, 8, seed=6, group_by_length=group_by_length).batches(0)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert sorted(flat(batches)) == list(range(103))
        assert len(batches) == len(sampler) == 13
        assert sorted(len(b) for b in batches) == [7] + [8] * 12


def test_two_ranks_get_disjoint_shards_of_equal_size():
    shards = [BatchSampler(LENGTHS[:100], 8, seed=1, rank=r, world_size=2).batches(3) for r in (0, 1)]
    assert set(flat(shards[0])).isdisjoint(flat(shards[1]))
    assert sorted(flat(shards[0]) + flat(shards[1])) == list(range(100))
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]]
    assert len(shards[0]) == len(BatchSampler(LENGTHS[:100], 8, seed=1, world_size=2)) == 7


def test_an_uneven_count_is_padded_by_repeats_so_ranks_stay_in_step():
    shards = [BatchSampler(LENGTHS, 8, seed=1, rank=r, world_size=2).batches(0) for r in (0, 1)]
    both = flat(shards[0]) + flat(shards[1])
    assert len(both) == 104 and set(both) == set(range(103))  # one index seen twice
    assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]]


def test_drop_last_keeps_only_full_batches():
    sampler = BatchSampler(LENGTHS, 8, seed=0, world_size=2, rank=1, drop_last=True)
    batches = sampler.batches(0)
    assert len(batches) == len(sampler) == 6 and all(len(b) == 8 for b in batches)


def test_without_shuffle_the_order_is_the_file_order():
    lengths = [3, 9, 1, 7, 5, 2, 8]
    assert BatchSampler(lengths, 3, seed=0, shuffle=False, group_by_length=False).batches(4) == [
        [0, 1, 2], [3, 4, 5], [6]]
    # Grouped: sorted by length, longest first, within each mega-chunk (here 1 batch wide).
    assert BatchSampler(lengths, 3, seed=0, shuffle=False, mega_batches=1).batches(0) == [
        [1, 0, 2], [3, 4, 5], [6]]


def padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_grouping_reduces_padding():
    gen = torch.Generator().manual_seed(0)
    # Mostly short sequences and a few long ones, as in real preference data.
    lengths = (torch.randint(8, 64, (950,), generator=gen).tolist()
               + torch.randint(400, 1024, (50,), generator=gen).tolist())
    grouped = BatchSampler(lengths, 8, seed=0)
    plain = BatchSampler(lengths, 8, seed=0, group_by_length=False)
    for epoch in range(2):
        with_grouping = padded_tokens(lengths, grouped.batches(epoch))
        assert with_grouping < 0.5 * padded_tokens(lengths, plain.batches(epoch))


def test_sampler_validates_its_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler([1], 0, seed=0)
    with pytest.raises(ValueError, match="rank 2"):
        BatchSampler([1], 1, seed=0, rank=2, world_size=2)
    assert BatchSampler([], 4, seed=0).batches(0) == [] and len(BatchSampler([], 4, seed=0)) == 0


# -- split_eval --------------------------------------------------------------------------------

def test_split_eval_is_deterministic_disjoint_and_ordered():
    items = list(range(50))
    train, held = split_eval(items, 0.1, seed=3)
    assert (train, held) == split_eval(items, 0.1, seed=3)
    assert len(held) == 5 and sorted(train + held) == items and not set(train) & set(held)
    assert train == sorted(train) and held == sorted(held)
    assert any(split_eval(items, 0.1, seed=s)[1] != held for s in range(4, 8))


@pytest.mark.parametrize("n, fraction, held", [(10, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0), (10, 0.0, 0)])
def test_split_eval_sizes(n, fraction, held):
    train, out = split_eval(list(range(n)), fraction, seed=0)
    assert len(out) == held and len(train) == n - held


@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_split_eval_refuses_a_fraction_outside_0_1(fraction):
    with pytest.raises(UsageError, match="eval fraction"):
        split_eval([1, 2, 3], fraction, seed=0)
