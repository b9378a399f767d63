"""The data side of supervised fine-tuning: the ``prompt-completion`` and ``messages`` formats,
reading demonstrations (and pairs as their chosen side), tokenising them, batching them, and
their log-probs on the tiny model.

The tiny tokenizer's ids (dpo.core.model.tiny): id = byte value for single bytes ("A" 65, " "
32 shown as "Ġ", "\\n" 10), then the merges from 256 ("Ġt" 256, "he" 257, "Ġthe" 258, "er"
260, "an" 261, "is" 271, ...), then <|endoftext|> 276 (the PAD), <|im_start|> 277,
<|im_end|> 278 (the EOS). Its chat template is ChatML: each message renders as
"<|im_start|>ROLE\\nCONTENT<|im_end|>\\n", and the generation prompt is
"<|im_start|>assistant\\n".
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path

import pytest
import torch

import dpo
from dpo.core.data.batching import collate_examples
from dpo.core.data.reading import SourcedDemonstration, load_demonstrations, load_pairs
from dpo.core.data.stats import DataStats
from dpo.core.data.tokenization import TokenizedExample, tokenize_demonstrations
from dpo.core.interfaces.data_format import Demonstration, PreferencePair, UnusableRecord
from dpo.core.interfaces.errors import DataError
from dpo.core.interfaces.plugins import DEFAULT_PLUGINS, collect, get_plugin_manager
from dpo.core.model.paths import PLAIN, Paths, verified_paths
from dpo.core.model.tiny import build_tiny_tokenizer
from dpo.plugins.formats.messages import MessagesFormat
from dpo.plugins.formats.prompt_completion import PromptCompletionFormat

EOS, PAD, START = 278, 276, 277
NL = 10
STRICT = "or run without --strict"
# Beside the repository: ../shared/data from its root.
HH_FILE = (Path(__file__).resolve().parents[2] / "shared" / "data"
           / "hh-rlhf-harmless-base-test-2000.jsonl.gz")

# "<|im_start|>user\n" and "<|im_start|>assistant\n" as ids: "user" is u s er, "assistant" is
# a s s is t an t ("an" and "is" are merges).
USER = [START, 117, 115, 260, NL]
ASSISTANT_OPENING = [START, 97, 115, 115, 271, 116, 261, 116, NL]

# Every turn is "role: content\n"; the generation prompt "assistant: " ends with a space, which
# byte-level BPE glues to the next word (" the" is one token): a boundary can fall in a token.
COLON_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


S, U, U2 = msg("system", "be brief"), msg("user", "hi"), msg("user", "and?")
A1, A2 = msg("assistant", "hello"), msg("assistant", "bye")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def demo(prompt, completion, line: int = 1) -> SourcedDemonstration:
    return SourcedDemonstration(Demonstration(prompt, completion), "data.jsonl", line)


def trained_ids(example: TokenizedExample) -> list[int]:
    """The ids the example trains: after the prompt, outside the untrained spans."""
    out = []
    for t in range(example.prompt_length, len(example.ids)):
        if not any(a <= t < b for a, b in example.untrained):
            out.append(example.ids[t])
    return out


@pytest.fixture(scope="module")
def formats():
    return collect(get_plugin_manager(load_entrypoints=False)).formats


@pytest.fixture
def tok():
    return build_tiny_tokenizer()


# -- the record and the formats ----------------------------------------------------------------

def test_demonstration_is_public_and_frozen():
    record = dpo.Demonstration("p", "c")
    assert dpo.Demonstration is Demonstration and "Demonstration" in dpo.__all__
    with pytest.raises(AttributeError):
        record.completion = "x"  # type: ignore[misc]


@pytest.mark.parametrize("module, name, cls", [
    ("dpo.plugins.formats.prompt_completion", "prompt-completion", PromptCompletionFormat),
    ("dpo.plugins.formats.messages", "messages", MessagesFormat),
])
def test_both_formats_are_default_plugins_registered_under_their_names(module, name, cls):
    assert module in DEFAULT_PLUGINS
    catalog = collect(get_plugin_manager(load_entrypoints=False, defaults=(module,)))
    assert catalog.formats.get(name) is cls
    assert catalog.registrations[module] == {"dpo_register_data_formats": [name]}


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "p", "completion": "c"}, True),
    ({"prompt": [U], "completion": [A1], "id": 7}, True),
    ({"completion": 3}, True),  # claimed, so that parse can say what is wrong with it
    ({"prompt": "p", "completion": "c", "rejected": "r"}, False),
    ({"prompt": "p", "completion": "c", "chosen": "r"}, False),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, False),
])
def test_prompt_completion_detects_a_completion_without_a_preference(record, expected):
    assert PromptCompletionFormat.detect(record) is expected


@pytest.mark.parametrize("record, expected", [
    ({"messages": [U, A1]}, True),
    ({"messages": []}, True),
    ({"messages": "hi"}, False),
    ({"messages": [U, A1], "completion": "c"}, False),
    ({"messages": [U, A1], "chosen": [A1], "rejected": [A2]}, False),
    ({"conversation": [U, A1]}, False),
])
def test_messages_detects_a_list_of_messages_alone(record, expected):
    assert MessagesFormat.detect(record) is expected


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "What is 2+2? ", "completion": "4", "id": 1}, Demonstration("What is 2+2? ", "4")),
    ({"prompt": [S, U], "completion": [A1, U2, A2]}, Demonstration([S, U], [A1, U2, A2])),
    # Text beside messages stays text: it becomes one message when rendered.
    ({"prompt": "hi", "completion": [A1]}, Demonstration("hi", [A1])),
    ({"prompt": [U], "completion": "hello"}, Demonstration([U], "hello")),
])
def test_prompt_completion_parses_text_and_messages(record, expected):
    assert PromptCompletionFormat().parse(record) == expected


@pytest.mark.parametrize("record, reason, message", [
    ({"prompt": "p", "completion": ""}, "empty", "'completion' is empty"),
    ({"prompt": [U], "completion": []}, "empty", "'completion' is empty"),
    ({"prompt": [U], "completion": [msg("assistant", "")]}, "empty", "'completion' is empty"),
    ({"prompt": "", "completion": "c"}, "empty_prompt", "the prompt is empty"),
    ({"prompt": [], "completion": [A1]}, "empty_prompt", "the prompt is empty"),
    ({"prompt": [U, A1], "completion": [A2]}, "bad_roles",
     "the prompt ends with an assistant message; it must end with the turn the completion "
     "answers"),
    ({"prompt": [U], "completion": [U2, A2]}, "bad_roles",
     "'completion' starts with a 'user' message; a completion must start with an assistant "
     "reply"),
])
def test_prompt_completion_unusable_records_name_a_reason(record, reason, message):
    with pytest.raises(UnusableRecord) as info:
        PromptCompletionFormat().parse(record)
    assert (info.value.reason, str(info.value)) == (reason, message)


@pytest.mark.parametrize("record, message", [
    ({"completion": "c"},
     "missing field 'prompt' (a prompt-completion record needs prompt and completion)"),
    ({"prompt": "p"},
     "missing field 'completion' (a prompt-completion record needs prompt and completion)"),
    ({"prompt": "p", "completion": 3},
     "field 'completion' must be text or a list of messages, got number"),
    ({"prompt": None, "completion": "c"},
     "field 'prompt' must be text or a list of messages, got null"),
    ({"prompt": [U], "completion": ["hello"]},
     "field 'completion', message 1: expected an object {\"role\": ..., \"content\": ...}, "
     "got string"),
    ({"prompt": [{"role": "user"}], "completion": [A1]},
     "field 'prompt', message 1: 'content' must be a string, got nothing"),
])
def test_prompt_completion_malformed_records_are_value_errors(record, message):
    with pytest.raises(ValueError) as info:
        PromptCompletionFormat().parse(record)
    assert not isinstance(info.value, UnusableRecord) and str(info.value) == message


@pytest.mark.parametrize("conversation, prompt, completion", [
    ([U, A1], [U], [A1]),
    ([S, U, A1], [S, U], [A1]),
    # Several turns: the completion is everything from the first assistant message on, a
    # trailing user turn included.
    ([U, A1, U2, A2], [U], [A1, U2, A2]),
    ([U, A1, U2], [U], [A1, U2]),
])
def test_messages_splits_at_the_first_assistant_message(conversation, prompt, completion):
    assert MessagesFormat().parse({"messages": conversation, "id": 3}) == \
        Demonstration(prompt, completion)


@pytest.mark.parametrize("conversation, reason, message", [
    ([S, U], "no_assistant",
     "the conversation has no assistant message, so there is no reply to learn"),
    ([], "no_assistant",
     "the conversation has no assistant message, so there is no reply to learn"),
    ([A1, U, A2], "empty_prompt",
     "the conversation starts with an assistant message: nothing precedes the reply to learn"),
    ([msg("system", ""), msg("user", ""), A1], "empty_prompt",
     "every message before the first assistant message is empty"),
    ([U, msg("assistant", ""), U2, msg("assistant", "")], "empty",
     "every assistant message is empty"),
])
def test_messages_unusable_records_name_a_reason(conversation, reason, message):
    with pytest.raises(UnusableRecord) as info:
        MessagesFormat().parse({"messages": conversation})
    assert (info.value.reason, str(info.value)) == (reason, message)


@pytest.mark.parametrize("record, message", [
    ({"conversation": [U, A1]}, "missing field 'messages' (a messages record needs a list of "
     "messages)"),
    ({"messages": "hi"}, "field 'messages' must be a list of messages, got string"),
    ({"messages": [U, 3]}, "field 'messages', message 2: expected an object "
     "{\"role\": ..., \"content\": ...}, got number"),
    ({"messages": [U, {"role": None, "content": "x"}]},
     "field 'messages', message 2: 'role' must be a string, got null"),
])
def test_messages_malformed_records_are_value_errors(record, message):
    with pytest.raises(ValueError) as info:
        MessagesFormat().parse(record)
    assert not isinstance(info.value, UnusableRecord) and str(info.value) == message


# -- reading -----------------------------------------------------------------------------------

def test_load_pairs_refuses_a_demonstration_with_its_file_and_line(tmp_path, formats):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError) as info:
        load_pairs(path, formats)
    assert str(info.value) == (
        f"{path}:1: prompt-completion format: this record is a demonstration (a prompt and one "
        "completion), not a preference pair: it has no rejected completion, and preference "
        "training needs pairs; train on it with `dpo sft`")
    assert (info.value.path, info.value.line) == (str(path), 1)


def test_load_pairs_names_the_line_of_the_first_demonstration_after_drops(tmp_path, formats):
    """A dropped record comes first (line 1: no assistant), then a demonstration (line 3)."""
    path = write_jsonl(tmp_path / "chat.jsonl",
                       [{"messages": [U]}, {"messages": [U, A1]}, {"messages": [U, A2]}])
    path.write_text(path.read_text().replace("\n", "\n\n", 1))  # a blank line 2
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: messages format: this "
                                        "record is a demonstration"):
        load_pairs(path, formats)


def test_load_demonstrations_reads_both_formats_with_their_sources(tmp_path, formats):
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "c"},
                                               {"prompt": [U], "completion": [A1]}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"messages": [S, U, A1, U2, A2]}])
    assert load_demonstrations(first, formats) == [
        SourcedDemonstration(Demonstration("p", "c"), str(first), 1),
        SourcedDemonstration(Demonstration([U], [A1]), str(first), 2)]
    assert load_demonstrations(second, formats) == [
        SourcedDemonstration(Demonstration([S, U], [A1, U2, A2]), str(second), 1)]


def test_load_demonstrations_trains_pairs_on_their_chosen_side(tmp_path, formats):
    """preference: (prompt, chosen); chat, whole conversations [U, A1] and [U, A2]: the shared
    prompt [U] and the chosen reply [A1]."""
    text = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"chosen": [U, A1], "rejected": [U, A2]}])
    assert load_demonstrations(text, formats) == [
        SourcedDemonstration(Demonstration("p", "c"), str(text), 1)]
    assert load_demonstrations(chat, formats) == [
        SourcedDemonstration(Demonstration([U], [A1]), str(chat), 1)]


def test_unusable_demonstrations_are_counted_as_examples_or_refused_under_strict(tmp_path,
                                                                                 formats):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [U, A1]}, {"messages": [U]}, {"messages": [A1, U]}, {"messages": [S]}])
    stats = DataStats()
    demos = load_demonstrations(path, formats, stats=stats)
    assert [d.line for d in demos] == [1]
    assert stats.unit == "examples" and stats.drops() == {"empty_prompt": 1, "no_assistant": 2}
    with pytest.raises(DataError) as info:
        load_demonstrations(path, formats, strict=True)
    assert str(info.value) == (
        f"{path}:2: messages format: the conversation has no assistant message, so there is no "
        f"reply to learn; fix or remove the record, {STRICT}")


def test_a_file_of_unusable_demonstrations_says_so(tmp_path, formats):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [U]}, {"messages": [S]}])
    with pytest.raises(DataError, match=r"no usable records: all 2 were dropped "
                                        r"\(no_assistant 2\)"):
        load_demonstrations(path, formats)


def test_a_malformed_demonstration_names_its_file_and_line(tmp_path, formats):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c"},
                                              {"prompt": "p", "completion": 3}])
    with pytest.raises(DataError) as info:
        load_demonstrations(path, formats)
    assert str(info.value) == (f"{path}:2: prompt-completion format: field 'completion' must be "
                               "text or a list of messages, got number")


def test_a_format_returning_something_else_is_named_as_a_plugin_bug(tmp_path):
    from dpo.core.interfaces.registry import Registry

    class Odd(dpo.DataFormat):
        name = "odd"

        @classmethod
        def detect(cls, record):
            return True

        def parse(self, record):
            return ("p", "c")

    registry: Registry[dpo.DataFormat] = Registry("data format", dpo.DataFormat)
    registry.add(Odd, provider="tests")
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": 1}])
    for load in (load_pairs, load_demonstrations):
        with pytest.raises(DataError) as info:
            load(path, registry)
        assert str(info.value) == (f"{path}:1: odd format: parse() returned tuple, not a "
                                   "PreferencePair, a Demonstration or a LabeledCompletion; a bug "
                                   "in the data format plugin")


def test_stats_count_one_unit_each():
    stats = DataStats()
    assert stats.counting("examples") is stats
    stats.read, stats.kept = 3, 2
    assert list(stats.as_dict())[:2] == ["examples_read", "examples_kept"]
    assert stats.as_dict()["examples_read"] == 3 and "pairs_read" not in stats.as_dict()
    with pytest.raises(ValueError, match="already count examples"):
        stats.counting("pairs")
    assert DataStats().as_dict() == {
        "pairs_read": 0, "pairs_kept": 0, "prompts_truncated": 0, "completions_truncated": 0,
        "dropped_empty": 0, "dropped_empty_prompt": 0, "dropped_identical": 0,
        "dropped_identical_after_truncation": 0}


@pytest.mark.skipif(not HH_FILE.exists(), reason=f"{HH_FILE} is not here")
def test_hh_rlhf_pairs_read_as_their_chosen_dialogues(formats):
    """Every HH-RLHF line read by ``load_demonstrations`` (format ``hh``, detected) is the
    chosen dialogue: prompt + completion is the line's ``chosen`` text, split after its last
    "\\n\\nAssistant:"; the lines the format drops are counted, and nothing else is lost."""
    raw = {}
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if text.strip():
                raw[line] = json.loads(text)
    stats = DataStats()
    demos = load_demonstrations(HH_FILE, formats, stats=stats)
    assert len(demos) + sum(stats.drops().values()) == len(raw) == 2000
    assert len(demos) > 1900
    for sd in demos:
        chosen = raw[sd.line]["chosen"]
        d = sd.demonstration
        assert isinstance(d.prompt, str) and isinstance(d.completion, str)
        assert d.prompt + d.completion == chosen
        assert d.prompt.endswith("\n\nAssistant:") and "\n\nAssistant:" not in d.completion
    first = demos[0].demonstration
    assert first.prompt.startswith("\n\nHuman: what are some pranks with a pen i can do?")


# -- tokenization: text --------------------------------------------------------------------------

def test_text_is_prompt_ids_then_completion_ids_and_one_eos(tok):
    """"Hi" is H 72, i 105; "yo" is y 121, o 111; then the EOS. The tiny tokenizer adds no
    BOS. A completion already ending with the EOS's text gets no second one."""
    (first, second), stats = tokenize_demonstrations(
        tok, [demo("Hi", "yo"), demo("Hi", "yo<|im_end|>", line=2)], 64, 32)
    expected = TokenizedExample((72, 105, 121, 111, EOS), 2, (), "data.jsonl:1")
    assert first == expected and first.trained_tokens == 3
    assert second == TokenizedExample(expected.ids, 2, (), "data.jsonl:2")
    assert stats.as_dict()["examples_read"] == 2 and stats.as_dict()["examples_kept"] == 2


def test_text_gets_the_bos_only_where_the_tokenizer_adds_one(bos_tok):
    """``bos_tok`` (conftest.py) puts <|endoftext|> (276) in front of every text by itself."""
    (example,), _ = tokenize_demonstrations(bos_tok, [demo("AB", "C")], 64, 32)
    assert example.ids == (PAD, 65, 66, 67, EOS) and example.prompt_length == 3
    # An empty prompt is then just the BOS, which predicts the completion's first token.
    (example,), _ = tokenize_demonstrations(bos_tok, [demo("", "C")], 64, 32)
    assert example.ids == (PAD, 67, EOS) and example.prompt_length == 1


def test_truncation_keeps_the_prompt_s_end_and_the_bos_and_the_completion_s_start(bos_tok):
    """Prompt BOS + "0123456789" (11 tokens) keeps the BOS and its last 3 digits (max prompt
    length 4); the completion "ABCDEFGH" + EOS (9 tokens) keeps 12 - 4 = 8: A..H, the EOS cut."""
    (example,), stats = tokenize_demonstrations(bos_tok, [demo("0123456789", "ABCDEFGH")], 12, 4)
    assert example.ids == (PAD, 55, 56, 57, *range(65, 73)) and example.prompt_length == 4
    assert (stats.prompts_truncated, stats.completions_truncated) == (1, 1)
    with pytest.raises(DataError) as info:
        tokenize_demonstrations(bos_tok, [demo("0123456789", "A")], 12, 4, strict=True)
    assert str(info.value) == (
        "data.jsonl:1: the prompt has 11 tokens, more than max_prompt_length 4; raise "
        f"--max-prompt-length, shorten or remove the record, {STRICT}")


@pytest.mark.parametrize("record, reason, problem", [
    (("P", ""), "empty", "the completion is empty: there is nothing to learn"),
    (([U], [msg("assistant", "")]), "empty", "the completion is empty: there is nothing to learn"),
    (("", "C"), "empty_prompt", "the prompt is empty: nothing precedes the completion"),
    (([U], [U2]), "no_assistant",
     "the completion has no assistant message: there is no reply to learn"),
])
def test_unusable_examples_are_dropped_and_counted_or_refused(tok, record, reason, problem):
    demos = [demo("P", "C", line=1), demo(*record, line=4)]
    out, stats = tokenize_demonstrations(tok, demos, 64, 32)
    assert [e.source for e in out] == ["data.jsonl:1"]
    assert stats.drops() == {reason: 1} and (stats.read, stats.kept) == (2, 1)
    with pytest.raises(DataError) as info:
        tokenize_demonstrations(tok, demos, 64, 32, strict=True)
    assert str(info.value) == f"data.jsonl:4: {problem}; fix or remove the record, {STRICT}"


def test_given_stats_are_counted_on_in_examples(tok):
    stats = DataStats()
    stats.drop("no_assistant", 2)
    out, returned = tokenize_demonstrations(tok, [demo("P", "C"), demo("P", "")], 64, 32,
                                            stats=stats)
    assert returned is stats and len(out) == 1
    assert stats.drops() == {"empty": 1, "no_assistant": 2}
    assert {k: v for k, v in stats.as_dict().items() if v} == {
        "examples_read": 2, "examples_kept": 1, "dropped_empty": 1, "dropped_no_assistant": 2}


# -- tokenization: chat ------------------------------------------------------------------------

def test_a_conversation_trains_each_assistant_turn_through_its_eos(tok):
    """Prompt [U "hi"], completion [A1 "hello", U2 "and?", A2 "bye"] in ChatML:

    prompt: USER + "hi" (h 104, i 105) + EOS + "\\n" + the generation prompt: 5 + 2 + 2 + 9 = 18
    tokens. Then "hello" (he 257, l 108, l 108, o 111) + EOS: trained (18..22). Then untrained
    (23..42, 20 tokens): the "\\n" after that EOS, the user turn USER + "and?" (an 261, d 100,
    ? 63) + EOS + "\\n" (10 tokens), and the opening of the next assistant turn (9 tokens).
    Then "bye" (b 98, y 121, e 101) + EOS: trained (43..46). The "\\n" after the last EOS is
    left out."""
    (example,), _ = tokenize_demonstrations(tok, [demo([U], [A1, U2, A2])], 64, 32)
    prompt = [*USER, 104, 105, EOS, NL, *ASSISTANT_OPENING]
    untrained = [NL, *USER, 261, 100, 63, EOS, NL, *ASSISTANT_OPENING]
    assert example.ids == (*prompt, 257, 108, 108, 111, EOS, *untrained, 98, 121, 101, EOS)
    assert example.prompt_length == 18 and example.untrained == ((23, 43),)
    assert trained_ids(example) == [257, 108, 108, 111, EOS, 98, 121, 101, EOS]
    assert example.trained_tokens == 9
    # The same conversation through the messages format gives the same example.
    parsed = MessagesFormat().parse({"messages": [U, A1, U2, A2]})
    (again,), _ = tokenize_demonstrations(
        tok, [SourcedDemonstration(parsed, "data.jsonl", 1)], 64, 32)
    assert again == example


def test_one_reply_is_trained_like_a_pair_s_chosen_side(tok):
    """A single-turn chat demonstration has the pair's prompt ids and chosen ids, no holes."""
    from dpo.core.data.reading import SourcedPair
    from dpo.core.data.tokenization import tokenize_pairs

    (example,), _ = tokenize_demonstrations(tok, [demo([S, U], [A1])], 64, 32)
    (tp,), _ = tokenize_pairs(tok, [SourcedPair(PreferencePair([S, U], [A1], [A2]), "d", 1)],
                              64, 32)
    assert example.ids == tp.prompt_ids + tp.chosen_ids
    assert example.prompt_length == len(tp.prompt_ids) and example.untrained == ()


def test_a_trailing_turn_of_another_role_is_left_out(tok):
    (example,), _ = tokenize_demonstrations(tok, [demo([U], [A1, U2])], 64, 32)
    assert example.ids[18:] == (257, 108, 108, 111, EOS) and example.untrained == ()


def test_a_completion_opening_with_another_role_starts_untrained(tok):
    """Prompt [U] rendered without the generation prompt (9 tokens), since the completion opens
    with a tool message: "<|im_start|>tool\\n42<|im_end|>\\n" (tool: t 116, o 111, o 111,
    l 108; 42: 52, 50; 10 tokens) and the assistant's opening (9) are untrained, [9, 28); then
    "hello" and the EOS are trained (28..32)."""
    tool = msg("tool", "42")
    (example,), _ = tokenize_demonstrations(tok, [demo([U], [tool, A1])], 64, 32)
    prompt = [*USER, 104, 105, EOS, NL]
    opening = [START, 116, 111, 111, 108, NL, 52, 50, EOS, NL, *ASSISTANT_OPENING]
    assert example.ids == (*prompt, *opening, 257, 108, 108, 111, EOS)
    assert example.prompt_length == 9 and example.untrained == ((9, 28),)
    assert example.trained_tokens == 5


def test_a_cut_completion_keeps_its_start_and_drops_an_untrained_tail(tok):
    """max_length 30 leaves 12 of the 29 completion tokens after the 18-token prompt: the
    first reply (5, trained) and 7 untrained ones, which are left out as the cut's tail."""
    (example,), stats = tokenize_demonstrations(tok, [demo([U], [A1, U2, A2])], 30, 20)
    assert example.ids[18:] == (257, 108, 108, 111, EOS) and example.untrained == ()
    assert stats.completions_truncated == 1
    # 45 leaves 27: the second reply is cut after "by" (98, 121), which is still trained.
    (example,), _ = tokenize_demonstrations(tok, [demo([U], [A1, U2, A2])], 45, 20)
    assert example.ids[-2:] == (98, 121) and example.untrained == ((23, 43),)
    assert example.trained_tokens == 7


def test_an_example_the_cut_leaves_untrained_is_dropped_or_refused(tok):
    """The tool turn and the assistant's opening (19 untrained tokens) fill the 11 tokens
    that max_length 20 leaves after the 9-token prompt: nothing trained is left."""
    demos = [demo([U], [msg("tool", "42"), A1], line=2)]
    out, stats = tokenize_demonstrations(tok, demos, 20, 10)
    assert out == [] and stats.drops() == {"untrained_after_truncation": 1}
    assert stats.completions_truncated == 1
    with pytest.raises(DataError) as info:
        tokenize_demonstrations(tok, demos, 20, 10, strict=True)
    assert str(info.value) == (
        "data.jsonl:2: no trained token is left once the completion is cut to the 11 tokens "
        f"that max_length 20 leaves after the prompt; raise --max-length, fix or remove the "
        f"record, {STRICT}")


def test_a_prompt_boundary_inside_a_token_is_refused(tok):
    """Prompt "user: Q\\nassistant: " is 16 tokens (u s er : Ġ Q \\n a s s is t an t : Ġ).
    Whole, "assistant: the end\\n" has "Ġthe" (258) at token 15 where the prompt alone ends
    with "Ġ" (32)."""
    tok.chat_template = COLON_TEMPLATE
    with pytest.raises(DataError) as info:
        tokenize_demonstrations(tok, [demo([msg("user", "Q")], "the end", line=3)], 64, 32)
    assert str(info.value) == (
        "data.jsonl:3: chat template: the prompt/completion boundary falls inside a token: the "
        "whole conversation and the prompt (16 tokens) + completion tokenised apart first "
        "differ at token 15 ('Ġthe' vs 'Ġ'), so the completion would start at a shifted token; "
        "use a chat template whose generation prompt ends at a token boundary (a newline or a "
        "special token)")


def test_a_turn_boundary_inside_a_token_is_refused(tok):
    """Prompt 16 tokens as above; reply "1\\n" (49, 10): 18; "user: and?\\n" (u s er : Ġ an d
    ? \\n): 27; the opening "assistant: " (a s s is t an t : Ġ): 36. Whole, "assistant: the
    end" has "Ġthe" at token 35 where the opening alone ends with "Ġ"."""
    tok.chat_template = COLON_TEMPLATE
    conversation = [msg("assistant", "1"), U2, msg("assistant", "the end")]
    with pytest.raises(DataError) as info:
        tokenize_demonstrations(tok, [demo([msg("user", "Q")], conversation, line=5)], 64, 32)
    assert str(info.value) == (
        "data.jsonl:5: chat template: a boundary between the completion's turns falls inside a "
        "token: the whole conversation and its turns tokenised apart first differ at token 35 "
        "('Ġthe' vs 'Ġ'), so a turn would start at a shifted token; use a chat template whose "
        "turns start and end at token boundaries (a newline or a special token)")


def test_a_template_without_eos_ends_the_last_reply_with_one(tok):
    """With the colon template (no EOS), an earlier reply is trained as rendered ("1\\n") and
    the last one gets the EOS appended ("2\\n" + EOS)."""
    tok.chat_template = COLON_TEMPLATE
    conversation = [msg("assistant", "1"), msg("user", "Q"), msg("assistant", "2")]
    (example,), _ = tokenize_demonstrations(tok, [demo([msg("user", "Q")], conversation)], 64, 32)
    assert trained_ids(example) == [49, NL, 50, NL, EOS]


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    """A template that renders an earlier assistant turn differently from the last one (as
    some drop an earlier turn's reasoning) renders [U, A1] with A1's content, then [U, A1, U2]
    without it: the second rendering does not continue the first, no stable turn boundary."""
    tok.chat_template = ("{% for m in messages %}"
                         "{% if m['role'] == 'assistant' and not loop.last %}"
                         "{{ 'assistant: (earlier)\\n' }}"
                         "{% else %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}"
                         "{% endif %}")
    with pytest.raises(DataError, match=r"^data\.jsonl:1: chat template: the rendered "
                                        r"conversation up to message 2 of the completion does "
                                        r"not start with its rendering up to message 1"):
        tokenize_demonstrations(tok, [demo([U], [A1, U2, A2])], 64, 32)


def test_chat_demonstrations_need_a_chat_template(tok):
    tok.chat_template = None
    with pytest.raises(DataError, match=r"^data\.jsonl:1: this example holds chat messages, but "
                                        "the tokenizer has no chat template"):
        tokenize_demonstrations(tok, [demo("hi", [A1])], 64, 32)


# -- batching ----------------------------------------------------------------------------------

def test_collate_examples_masks_exactly_the_trained_tokens():
    """Row 0: ids 5..11, prompt 2, untrained [3, 5): trained at 2, 5, 6. Row 1: ids 20..23,
    prompt 3: trained at 3. Padded with 0 to 7, then to a multiple of 4: 8."""
    examples = [TokenizedExample((5, 6, 7, 8, 9, 10, 11), 2, ((3, 5),)),
                TokenizedExample((20, 21, 22, 23), 3)]
    batch = collate_examples(examples, pad_token_id=0, pad_to_multiple_of=4)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 0], [20, 21, 22, 23, 0, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1] * 7 + [0], [1] * 4 + [0] * 4]
    assert batch.completion_mask.tolist() == [
        [False, False, True, False, False, True, True, False],
        [False, False, False, True, False, False, False, False]]
    assert batch.row_lengths == (7, 4) and batch.prompt_lengths == ()
    assert batch.completion_tokens == 4 and batch.ref_logps is None
    assert batch.rows == 2 and not batch.paired
    # Without holes, the prompt lengths are given (the shared and packed paths may use them).
    plain = collate_examples(examples[1:], pad_token_id=0, pad_length=lambda n: 6)
    assert plain.prompt_lengths == (3,) and plain.input_ids.shape == (1, 6)
    assert plain.completion_mask.tolist() == [[False, False, False, True, False, False]]


def test_select_takes_examples_in_a_batch_of_examples():
    examples = [TokenizedExample((5, 6, 7, 8, 9, 10, 11), 2, ((3, 5),)),
                TokenizedExample((20, 21, 22, 23), 3),
                TokenizedExample((30, 31, 32), 1)]
    batch = collate_examples(examples, pad_token_id=0)
    part = batch.select([1, 2])
    assert part.input_ids.tolist() == [[20, 21, 22, 23], [30, 31, 32, 0]]
    assert part.completion_mask.tolist() == [[False, False, False, True],
                                             [False, True, True, False]]
    assert part.completion_tokens == 3 and part.row_lengths == (4, 3) and not part.paired
    plain = collate_examples(examples[1:], pad_token_id=0).select([1])
    assert plain.prompt_lengths == (1,) and plain.completion_tokens == 2


def test_collate_examples_needs_an_example():
    with pytest.raises(ValueError, match="at least one example"):
        collate_examples([], pad_token_id=0)


# -- log-probs on the tiny model ---------------------------------------------------------------

PADDED = Paths(batched=True, unmasked=True, chunked_head=True, tied_buffer=True)
SHARED = Paths(batched=True, unmasked=True, chunked_head=True, tied_buffer=True, shared_prompt=True)
PACKED = Paths(batched=True, unmasked=True, chunked_head=True, tied_buffer=True, packed_rows=True)


def by_hand(model, example: TokenizedExample) -> torch.Tensor:
    """The example alone through the model: the sum over its trained positions t of
    log_softmax(logits[t - 1])[ids[t]]."""
    ids = torch.tensor([example.ids])
    logps = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    total = torch.zeros((), dtype=torch.float32)
    for t in range(example.prompt_length, len(example.ids)):
        if not any(a <= t < b for a, b in example.untrained):
            total = total + logps[t - 1, example.ids[t]]
    return total


def sft_examples(tok) -> list[TokenizedExample]:
    """A text example, a conversation with an untrained span, and a one-turn chat example."""
    out, _ = tokenize_demonstrations(tok, [demo("What is 2+2? ", "4"),
                                           demo([U], [A1, U2, A2]),
                                           demo([S, U], [A2])], 64, 32)
    assert [bool(e.untrained) for e in out] == [False, True, False]
    return out


@pytest.mark.parametrize("holes", [False, True])
@pytest.mark.parametrize("paths", ["plain", "verified", "padded", "shared", "packed"])
def test_batch_logps_of_examples_is_the_sum_over_trained_tokens(tiny_model, tiny_tokenizer,
                                                                  monkeypatch, holes, paths):
    """Each row's log-prob is the hand-computed sum over its trained tokens and its count is
    their number, on the plain path and on the speed paths the tiny Llama verifies (the shared
    prompt among them, which a batch of examples never takes) and packed rows (taken where no
    row has holes: with sdpa transformers masks the packed rows block by block)."""
    from dpo.core.model import logps as logps_module

    examples = [e for e in sft_examples(tiny_tokenizer) if holes or not e.untrained]
    batch = collate_examples(examples, pad_token_id=PAD)
    chosen = {"plain": PLAIN, "verified": verified_paths(tiny_model), "padded": PADDED,
              "shared": SHARED, "packed": PACKED}[paths]
    assert paths != "verified" or chosen.shared_prompt  # the path batches of examples avoid
    calls = []
    packed = logps_module.packed_logps

    def spy(*args, **kwargs):
        calls.append("packed")
        return packed(*args, **kwargs)

    monkeypatch.setattr(logps_module, "packed_logps", spy)
    logps, counts = logps_module.batch_logps(tiny_model, batch, paths=chosen)
    assert calls == (["packed"] if paths == "packed" and not holes else [])
    assert counts.tolist() == [e.trained_tokens for e in examples]
    want = torch.stack([by_hand(tiny_model, e) for e in examples])
    torch.testing.assert_close(logps, want.detach(), rtol=1e-5, atol=1e-5)
    run = logps_module.tokens_run(batch, chosen)
    assert run == (sum(batch.row_lengths) if calls else batch.input_ids.numel())


def test_gradients_of_a_conversation_match_the_plain_path(tiny_model, tiny_tokenizer):
    """On the verified speed paths (chunked head, tied buffer...), a batch with an untrained
    span gives the plain path's gradient of the summed log-probs."""
    batch = collate_examples(sft_examples(tiny_tokenizer), pad_token_id=PAD)
    from dpo.core.model.logps import batch_logps

    def grads(model, paths):
        model.zero_grad()
        logps, _ = batch_logps(model, batch, paths=paths)
        logps.sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters()]

    model = copy.deepcopy(tiny_model)
    fast, fast_grads = grads(model, verified_paths(model))
    plain, plain_grads = grads(model, PLAIN)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
