"""Drop counts, strict mode and the token-level chat boundary check of ``tokenize_pairs``.

The tiny tokenizer's ids (dpo.core.model.tiny): id = byte value for single bytes ("A" 65, " " 32 shown
as "Ġ", "\\n" 10), then the merges from 256 ("Ġt" 256, "he" 257, "Ġthe" 258, ...), then
<|endoftext|> 276, <|im_start|> 277, <|im_end|> 278 (the EOS).
"""

from __future__ import annotations

import pytest

from dpo.core.interfaces.data_format import PreferencePair
from dpo.core.data.reading import SourcedPair
from dpo.core.interfaces.errors import DataError
from dpo.core.model.tiny import build_tiny_tokenizer
from dpo.core.data.stats import DataStats
from dpo.core.data.tokenization import TokenizedPair, tokenize_pairs

EOS = 278
STRICT = "; fix or remove the record, or run without --strict"

# Every turn is "role: content\n"; the generation prompt "assistant: " ends with a space, which
# byte-level BPE glues to the next word (" the" is one token): the boundary can fall in a token.
COLON_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def sourced(prompt, chosen, rejected, line: int = 1) -> SourcedPair:
    return SourcedPair(PreferencePair(prompt, chosen, rejected), "data.jsonl", line)


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


@pytest.fixture
def tok():
    return build_tiny_tokenizer()


# -- DataStats ---------------------------------------------------------------------------------

def test_drop_reasons_share_the_fixed_counters_and_others_are_listed_after_them():
    stats = DataStats(read=5)
    stats.drop("empty")
    stats.drop("no_shared_prompt", 2)
    stats.drop("identical")
    stats.drop("a_reason")
    assert stats.dropped_empty == 1 and stats.dropped_identical == 1
    assert stats.drops() == {"empty": 1, "identical": 1, "a_reason": 1, "no_shared_prompt": 2}
    assert stats.as_dict() == {
        "pairs_read": 5, "pairs_kept": 0, "prompts_truncated": 0, "completions_truncated": 0,
        "dropped_empty": 1, "dropped_empty_prompt": 0, "dropped_identical": 1,
        "dropped_identical_after_truncation": 0, "dropped_a_reason": 1,
        "dropped_no_shared_prompt": 2,
    }


def test_given_stats_are_counted_on(tok):
    """Stats a reader already counted (2 records without a shared prompt) keep their counts."""
    stats = DataStats()
    stats.drop("no_shared_prompt", 2)
    out, returned = tokenize_pairs(tok, [sourced("P", "A", "B"), sourced("P", "", "B")], 64, 32,
                                   stats=stats)
    assert returned is stats and len(out) == 1
    assert stats.drops() == {"empty": 1, "no_shared_prompt": 2}
    assert (stats.read, stats.kept) == (2, 1)


# -- strict ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pair, problem", [
    (("P", "", "B"), "chosen or rejected is empty: there is no completion to learn" + STRICT),
    (("P", assistant(""), "B"), "chosen or rejected is empty: there is no completion to learn"
     + STRICT),
    (("", "A", "B"), "the prompt is empty: nothing precedes the completions" + STRICT),
    (("P", "SAME", "SAME"), "chosen and rejected are identical: no preference to learn" + STRICT),
    # max_length 8, prompt "0123" (4 tokens): 4 left, "ABCD1" and "ABCD2" both cut to "ABCD".
    (("0123", "ABCD1", "ABCD2"), "chosen and rejected are identical once cut to the 4 tokens "
     "that max_length 8 leaves after the prompt; raise --max-length, fix or remove the record, "
     "or run without --strict"),
    # "012345" is 6 tokens (one per digit), over max_prompt_length 5.
    (("012345", "A", "B"), "the prompt has 6 tokens, more than max_prompt_length 5; raise "
     "--max-prompt-length, shorten or remove the record, or run without --strict"),
])
def test_strict_refuses_what_would_be_dropped_or_truncated(tok, pair, problem):
    pairs = [sourced("P", "A", "B", line=1), sourced(*pair, line=3)]
    with pytest.raises(DataError) as info:
        tokenize_pairs(tok, pairs, 8, 5, strict=True)
    assert str(info.value) == f"data.jsonl:3: {problem}"
    assert (info.value.path, info.value.line) == ("data.jsonl", 3)
    out, stats = tokenize_pairs(tok, pairs, 8, 5)  # the same pairs without strict: dropped or cut
    assert out[0].source == "data.jsonl:1" and stats.read == 2
    assert sum(stats.drops().values()) + stats.prompts_truncated == 1


def test_strict_keeps_clean_pairs_and_cut_completions(tok):
    """Only the prompt limit is strict: completions are still cut (both sides, counted)."""
    out, stats = tokenize_pairs(tok, [sourced("01", "ABCDEFGH", "XY")], 8, 4, strict=True)
    assert out == [TokenizedPair((48, 49), (65, 66, 67, 68, 69, 70), (88, 89, EOS),
                                 "data.jsonl:1")]
    assert stats.completions_truncated == 1 and stats.drops() == {}


# -- the chat boundary -------------------------------------------------------------------------

def test_chatml_boundary_holds_where_bpe_would_merge_text(tok):
    """ChatML's generation prompt ends with "\\n", a token of its own: the completion "the"
    tokenises the same alone ("t" 116, "he" 257) as after the prompt."""
    (tp,), _ = tokenize_pairs(tok, [sourced(user("Q"), assistant("the"), assistant("1"))], 64, 32)
    assert tp.prompt_ids[-1] == 10
    assert tp.chosen_ids == (116, 257, EOS)
    assert tp.rejected_ids == (49, EOS)


def test_a_boundary_inside_a_token_is_an_error_naming_the_position(tok):
    """Prompt "user: Q\\nassistant: " is 16 tokens: "u" "s" "er" ":" "Ġ" "Q" "\\n"
    "a" "s" "s" "is" "t" "an" "t" ":" "Ġ". Whole, "assistant: the end\\n" has "Ġthe" (258) at
    token 15 where the prompt alone ends with "Ġ" (32): the first difference is token 15."""
    tok.chat_template = COLON_TEMPLATE
    pair = sourced(user("Q"), assistant("1"), assistant("the end"), line=4)
    with pytest.raises(DataError) as info:
        tokenize_pairs(tok, [sourced(user("Q"), assistant("1"), assistant("2")), pair], 64, 32)
    assert str(info.value) == (
        "data.jsonl:4: chat template: the prompt/completion boundary of 'rejected' falls inside "
        "a token: the whole conversation and the prompt (16 tokens) + completion tokenised apart "
        "first differ at token 15 ('Ġthe' vs 'Ġ'), so the completion would start at a shifted "
        "token; use a chat template whose generation prompt ends at a token boundary (a newline "
        "or a special token)")


def test_the_same_template_passes_where_the_boundary_is_a_token_boundary(tok):
    """" 1" is two tokens ("Ġ" 32, "1" 49) whole or apart, so the pair is kept; the template
    writes no EOS, so one is appended."""
    tok.chat_template = COLON_TEMPLATE
    (tp,), _ = tokenize_pairs(tok, [sourced(user("Q"), assistant("1"), assistant("2"))], 64, 32)
    assert len(tp.prompt_ids) == 16 and tp.prompt_ids[-1] == 32
    assert tp.chosen_ids == (49, 10, EOS) and tp.rejected_ids == (50, 10, EOS)


def test_the_boundary_check_holds_for_every_pair_even_under_no_strict(tok):
    """A shifted boundary is never dropped quietly, whatever strict says."""
    tok.chat_template = COLON_TEMPLATE
    with pytest.raises(DataError, match="data.jsonl:1: chat template: the prompt/completion"):
        tokenize_pairs(tok, [sourced(user("Q"), assistant("the"), assistant("1"))], 64, 32,
                       strict=False)
