"""The built-in ``chat`` data format, and detection among the built-in formats (those of
demonstrations, ``prompt-completion`` and ``messages``, included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo.core.interfaces.data_format import PreferencePair, UnusableRecord
from dpo.core.data.reading import load_pairs
from dpo.core.data.tokenization import tokenize_pairs
from dpo.core.interfaces.errors import DataError
from dpo.core.interfaces.plugins import DEFAULT_PLUGINS, collect, get_plugin_manager
from dpo.core.model.tiny import build_tiny_tokenizer
from dpo.core.data.stats import DataStats
from dpo.plugins.formats.chat import ChatFormat

MODULE = "dpo.plugins.formats.chat"
FORMAT_MODULES = (MODULE, "dpo.plugins.formats.hh", "dpo.plugins.formats.preference",
                  "dpo.plugins.formats.prompt_completion", "dpo.plugins.formats.messages")


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


S, U, U2 = msg("system", "be brief"), msg("user", "hi"), msg("user", "and?")
A1, A2, A3 = msg("assistant", "hello"), msg("assistant", "go away"), msg("assistant", "bye")


@pytest.fixture(scope="module")
def formats():
    return collect(get_plugin_manager(load_entrypoints=False, defaults=FORMAT_MODULES)).formats


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_is_a_default_plugin_and_registers_under_its_name():
    assert MODULE in DEFAULT_PLUGINS
    catalog = collect(get_plugin_manager(load_entrypoints=False, defaults=(MODULE,)))
    assert catalog.formats.get("chat") is ChatFormat
    assert catalog.registrations[MODULE] == {"dpo_register_data_formats": ["chat"]}


@pytest.mark.parametrize("record, expected", [
    ({"prompt": [U], "chosen": [A1], "rejected": [A2]}, "chat"),
    ({"prompt": "hi", "chosen": [A1], "rejected": [A2]}, "chat"),
    ({"prompt": [U], "chosen": "hello", "rejected": "go away"}, "chat"),
    ({"chosen": [U, A1], "rejected": [U, A2]}, "chat"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
     "hh"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b"}, "preference"),
    ({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " a", "rejected": " b"}, "preference"),
    ({"chosen": "a", "rejected": "b"}, None),  # text without HH turns: nobody's
    ({"prompt": None, "chosen": [A1], "rejected": [A2]}, None),
    ({"prompt": [U], "chosen": [A1]}, None),
    ({"prompt": "hi", "completion": "hello"}, "prompt-completion"),
    ({"prompt": [U], "completion": [A1]}, "prompt-completion"),
    ({"prompt": "hi", "completion": "a", "chosen": "b"}, None),  # neither pair nor demonstration
    ({"messages": [U, A1]}, "messages"),
    ({"messages": [U, A1], "completion": "x"}, "prompt-completion"),
    ({"messages": "hi"}, None),
])
def test_each_record_is_recognised_by_at_most_one_builtin_format(formats, record, expected):
    claimed = [name for name, cls in formats if cls.detect(record)]
    assert claimed == ([expected] if expected else [])


def test_a_string_prompt_is_one_user_message_and_lists_are_kept():
    record = {"prompt": "hi", "chosen": [A1], "rejected": [A2, msg("user", "x"), A3], "id": 3}
    assert ChatFormat().parse(record) == PreferencePair([U], [A1], [A2, msg("user", "x"), A3])


def test_string_completions_are_one_assistant_message_each():
    record = {"prompt": [S, U], "chosen": "hello", "rejected": "go away"}
    assert ChatFormat().parse(record) == PreferencePair([S, U], [A1], [A2])


@pytest.mark.parametrize("chosen, rejected, expected", [
    ([U, A1], [U, A2], PreferencePair([U], [A1], [A2])),
    ([S, U, A1], [S, U, A2, U2, A3], PreferencePair([S, U], [A1], [A2, U2, A3])),
    # The longest shared run, across several turns; the first assistant reply is shared.
    ([U, A1, U2, A2], [U, A1, U2, A3], PreferencePair([U, A1, U2], [A2], [A3])),
])
def test_whole_conversations_share_their_longest_common_beginning(chosen, rejected, expected):
    assert ChatFormat().parse({"chosen": chosen, "rejected": rejected}) == expected


@pytest.mark.parametrize("record, reason, message", [
    ({"chosen": [U, A1], "rejected": [U, A1]}, "identical",
     "chosen and rejected are the same conversation"),
    ({"chosen": [U, A1], "rejected": [U2, A1]}, "no_shared_prompt",
     "chosen and rejected differ from their first message, so they share no prompt"),
    ({"chosen": [U, A1], "rejected": [U, A1, U2, A2]}, "empty",
     "'chosen' ends where the shared prompt ends (message 2): it has no reply of its own"),
    ({"chosen": [U, A1, U2], "rejected": [U, A1, msg("user", "x")]}, "no_shared_prompt",
     "the prompt ends with an assistant message (the conversations share 2 messages); "
     "it must end with the turn the completions answer"),
    ({"chosen": [S, U, A1], "rejected": [S, U2, A1]}, "no_shared_prompt",
     "'chosen' starts with a 'user' message (the conversations share 1 message); "
     "a completion must start with an assistant reply"),
    ({"prompt": [], "chosen": [A1], "rejected": [A2]}, "empty_prompt", "the prompt is empty"),
    ({"prompt": "", "chosen": [A1], "rejected": [A2]}, "empty_prompt", "the prompt is empty"),
    ({"prompt": [U], "chosen": [], "rejected": [A2]}, "empty", "'chosen' is empty"),
    ({"prompt": [U], "chosen": [A1], "rejected": [msg("assistant", "")]}, "empty",
     "'rejected' is empty"),
    ({"prompt": [U], "chosen": [A1], "rejected": [A1]}, "identical",
     "chosen and rejected are the same messages"),
    ({"prompt": [U, A1], "chosen": [A2], "rejected": [A3]}, "bad_roles",
     "the prompt ends with an assistant message; it must end with the turn the completions "
     "answer"),
    ({"prompt": [U], "chosen": [A1], "rejected": [U2, A3]}, "bad_roles",
     "'rejected' starts with a 'user' message; a completion must start with an assistant reply"),
])
def test_unusable_records_name_a_reason(record, reason, message):
    with pytest.raises(UnusableRecord) as info:
        ChatFormat().parse(record)
    assert (info.value.reason, str(info.value)) == (reason, message)


@pytest.mark.parametrize("record, message", [
    ({"prompt": [U], "chosen": [A1]}, "missing field 'rejected'"),
    ({"chosen": [U, A1]}, "missing field 'rejected'"),
    ({"chosen": [U, A1], "rejected": "go away"},
     "field 'rejected' must be a list of messages (a whole conversation) when there is no "
     "'prompt', got string"),
    ({"prompt": 7, "chosen": [A1], "rejected": [A2]},
     "field 'prompt' must be text or a list of messages, got number"),
    ({"prompt": [U], "chosen": [A1, "x"], "rejected": [A2]},
     "field 'chosen', message 2: expected an object {\"role\": ..., \"content\": ...}, got string"),
    ({"prompt": [U], "chosen": [{"role": "assistant"}], "rejected": [A2]},
     "field 'chosen', message 1: 'content' must be a string, got nothing"),
    ({"prompt": [{"role": None, "content": "x"}], "chosen": [A1], "rejected": [A2]},
     "field 'prompt', message 1: 'role' must be a string, got null"),
])
def test_malformed_records_are_plain_value_errors(record, message):
    with pytest.raises(ValueError) as info:
        ChatFormat().parse(record)
    assert not isinstance(info.value, UnusableRecord)
    assert message in str(info.value)


def test_a_file_of_conversations_end_to_end(tmp_path, formats):
    """Line 2 shares no prompt: dropped and counted. The tiny tokenizer's ChatML template renders
    the prompt as "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n"; the completion is
    "hello" and the EOS <|im_end|>, the template's trailing newline dropped."""
    tok = build_tiny_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"chosen": [U, A1], "rejected": [U, A2]},
        {"chosen": [U, A1], "rejected": [U2, A2]},
        {"prompt": "hi", "chosen": [A1], "rejected": [A3]},
    ])
    stats = DataStats()
    pairs = load_pairs(path, formats, stats=stats)
    assert [p.line for p in pairs] == [1, 3]
    out, stats = tokenize_pairs(tok, pairs, 64, 32, stats=stats)
    prompt = tuple(tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n").input_ids)
    assert [tp.prompt_ids for tp in out] == [prompt, prompt]
    assert out[0].chosen_ids == (*tok("hello").input_ids, tok.eos_token_id)
    assert out[1].rejected_ids == (*tok("bye").input_ids, tok.eos_token_id)
    assert stats.drops() == {"no_shared_prompt": 1} and stats.kept == 2
    with pytest.raises(DataError) as info:
        load_pairs(path, formats, strict=True)
    assert str(info.value) == (f"{path}:2: chat format: chosen and rejected differ from their "
                               "first message, so they share no prompt; fix or remove the "
                               "record, or run without --strict")


def test_has_no_options():
    assert ChatFormat.describe_options() == []
