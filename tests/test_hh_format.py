"""The built-in ``hh`` data format (Anthropic HH-RLHF dialogues)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo.core.interfaces.data_format import PreferencePair, UnusableRecord
from dpo.core.data.reading import load_pairs
from dpo.core.data.tokenization import tokenize_pairs
from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.plugins import DEFAULT_PLUGINS, collect, get_plugin_manager
from dpo.core.model.tiny import build_tiny_tokenizer
from dpo.core.data.stats import DataStats
from dpo.plugins.formats.hh import HHFormat

MODULE = "dpo.plugins.formats.hh"
REAL_DATA = (Path(__file__).parents[2] / "shared" / "data"
             / "hh-rlhf-harmless-base-test-2000.jsonl.gz")

HEAD = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant:"
CHOSEN = HEAD + " Sure, here."
REJECTED = HEAD + " No."


def chat(*, render: str) -> HHFormat:
    return HHFormat(HHFormat.parse_options({"render": render}))


def test_is_a_default_plugin_with_a_render_option():
    assert MODULE in DEFAULT_PLUGINS
    catalog = collect(get_plugin_manager(load_entrypoints=False, defaults=(MODULE,)))
    assert catalog.formats.get("hh") is HHFormat
    assert HHFormat().options.render == "verbatim"
    assert chat(render="chat").options.render == "chat"
    with pytest.raises(UsageError, match=r"data format 'hh': option render=xml"):
        HHFormat.parse_options({"render": "xml"})


@pytest.mark.parametrize("record, expected", [
    ({"chosen": CHOSEN, "rejected": REJECTED}, True),
    ({"chosen": CHOSEN, "rejected": REJECTED, "source": "x"}, True),
    ({"prompt": "", "chosen": CHOSEN, "rejected": REJECTED}, False),  # a preference record
    ({"chosen": "\n\nHuman: hi", "rejected": REJECTED}, False),  # no reply to split off
    ({"chosen": CHOSEN}, False),
    ({"chosen": [CHOSEN], "rejected": REJECTED}, False),
])
def test_detect(record, expected):
    assert HHFormat.detect(record) is expected


def test_verbatim_splits_after_the_last_assistant_turn_and_keeps_the_leading_space():
    assert HHFormat().parse({"chosen": CHOSEN, "rejected": REJECTED}) == PreferencePair(
        HEAD, " Sure, here.", " No.")


def test_chat_render_gives_stripped_user_and_assistant_messages():
    expected = PreferencePair(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "more?"}],
        [{"role": "assistant", "content": "Sure, here."}],
        [{"role": "assistant", "content": "No."}],
    )
    assert chat(render="chat").parse({"chosen": CHOSEN, "rejected": REJECTED}) == expected


@pytest.mark.parametrize("chosen, rejected, reason, message", [
    (CHOSEN, "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: more?\n\nAssistant: No.",
     "no_shared_prompt", "'rejected' does not start with the dialogue of 'chosen' up to its "
     "last '\\n\\nAssistant:' (55 characters), so the two share no prompt"),
    ("\n\nHuman: hi", REJECTED, "no_assistant_turn",
     "'chosen' has no '\\n\\nAssistant:' turn, so there is no reply to learn"),
    (HEAD + " ", REJECTED, "empty", "the last reply of 'chosen' is empty"),
    (HEAD + " No.", REJECTED, "identical", "chosen and rejected are the same dialogue"),
])
@pytest.mark.parametrize("render", ["verbatim", "chat"])
def test_unusable_records_name_a_reason(chosen, rejected, reason, message, render):
    """The shared prompt, HEAD, is 55 characters: "\\n\\nHuman:" 8 + " hi" 3 +
    "\\n\\nAssistant:" 12 + " hello" 6 + "\\n\\nHuman:" 8 + " more?" 6 + "\\n\\nAssistant:" 12."""
    assert len(HEAD) == 8 + 3 + 12 + 6 + 8 + 6 + 12 == 55
    with pytest.raises(UnusableRecord) as info:
        chat(render=render).parse({"chosen": chosen, "rejected": rejected})
    assert (info.value.reason, str(info.value)) == (reason, message)


@pytest.mark.parametrize("text, message", [
    # Two Human turns in a row (as in a few HH lines): fine as text, not as chat messages.
    ("\n\nHuman: hi\n\nHuman: hello?\n\nAssistant: yes",
     "turn 2 of 'chosen' is 'user' where 'assistant' is due"),
    ("\n\nAssistant: hi\n\nHuman: ok\n\nAssistant: yes",
     "turn 1 of 'chosen' is 'assistant' where 'user' is due"),
])
def test_chat_render_needs_alternating_turns(text, message):
    record = {"chosen": text, "rejected": text[:-3] + "no"}
    assert isinstance(HHFormat().parse(record), PreferencePair)
    with pytest.raises(UnusableRecord) as info:
        chat(render="chat").parse(record)
    assert info.value.reason == "not_alternating" and str(info.value).startswith(message)


def test_chat_render_refuses_text_before_the_first_turn():
    record = {"chosen": "Preamble" + CHOSEN, "rejected": "Preamble" + REJECTED}
    with pytest.raises(UnusableRecord) as info:
        chat(render="chat").parse(record)
    assert info.value.reason == "not_a_dialogue"


@pytest.mark.parametrize("record, message", [
    ({"chosen": CHOSEN}, "missing field 'rejected'"),
    ({"chosen": CHOSEN, "rejected": None}, "field 'rejected' must be a string, got null"),
])
def test_malformed_records_are_plain_value_errors(record, message):
    with pytest.raises(ValueError) as info:
        HHFormat().parse(record)
    assert not isinstance(info.value, UnusableRecord) and str(info.value).startswith(message)


@pytest.mark.parametrize("render", ["verbatim", "chat"])
def test_tokenised_end_to_end(tmp_path, render):
    """Verbatim: prompt and completions are tokenised apart as text, the reply " Sure, here."
    keeps its space, then the EOS. Chat: the tiny ChatML template renders the three prompt
    messages and opens the assistant turn; the completion is "Sure, here." and the EOS."""
    tok = build_tiny_tokenizer()
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": CHOSEN, "rejected": REJECTED}) + "\n")
    formats = collect(get_plugin_manager(load_entrypoints=False, defaults=(MODULE,))).formats
    (tp,), _ = tokenize_pairs(tok, load_pairs(path, formats, "hh", {"render": render}), 256, 128)
    if render == "verbatim":
        prompt, reply = HEAD, " Sure, here."
    else:
        prompt = ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                  "<|im_start|>user\nmore?<|im_end|>\n<|im_start|>assistant\n")
        reply = "Sure, here."
    assert tp.prompt_ids == tuple(tok(prompt).input_ids)
    assert tp.chosen_ids == (*tok(reply).input_ids, tok.eos_token_id)


@pytest.mark.skipif(not REAL_DATA.exists(), reason=f"{REAL_DATA} is not here")
@pytest.mark.parametrize("render, kept, drops", [
    # Counted by reading the file: 4 chosen replies are blank, 3 rejected dialogues differ
    # before the last reply; as chat, 5 more have two turns of one speaker in a row.
    ("verbatim", 1993, {"empty": 4, "no_shared_prompt": 3}),
    ("chat", 1988, {"empty": 4, "no_shared_prompt": 3, "not_alternating": 5}),
])
def test_the_real_harmless_base_test_split(render, kept, drops):
    formats = collect(get_plugin_manager(load_entrypoints=False, defaults=(MODULE,))).formats
    stats = DataStats()
    pairs = load_pairs(REAL_DATA, formats, options={"render": render}, stats=stats)
    assert len(pairs) == kept and stats.drops() == drops
    assert pairs[0].line == 1 and pairs[-1].line == 2000
    out, stats = tokenize_pairs(build_tiny_tokenizer(), pairs[:200], 1024, 512)
    assert len(out) == 200 and stats.drops() == {}
