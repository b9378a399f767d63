"""Preference pairs to token ids: one EOS, no duplicate BOS, explicit symmetric truncation.

The prompt and each completion are tokenised separately, so the prompt/completion boundary is
exact at the token level: the completion's first token is the first token the model is asked to
predict, never one merged across the boundary. For chat messages the boundary is also checked:
the whole rendered conversation must tokenise to exactly the prompt's tokens followed by the
completion's, or the pair is refused (the template's boundary falls inside a token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dpo.core.interfaces.data_format import Text
from dpo.core.data.reading import SourcedPair
from dpo.core.data.stats import STRICT_HINT, DataStats
from dpo.core.interfaces.errors import DataError, UsageError

@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair. Each completion ends with the EOS unless truncation cut it."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    source: str = ""  # "path:line"


@dataclass(frozen=True)
class _Rendered:
    """A pair as the strings to tokenise, before any ids exist."""

    prompt: str
    chosen: str
    rejected: str
    chat: bool
    empty: bool  # a completion with no content


def tokenize_pairs(tokenizer: Any, pairs: list[SourcedPair], max_length: int,
                   max_prompt_length: int, *, strict: bool = False,
                   stats: DataStats | None = None) -> tuple[list[TokenizedPair], DataStats]:
    """Tokenise, truncate and filter ``pairs``; the survivors keep their order.

    Text pairs: prompt ids are the prompt's tokens (with the BOS only if the tokenizer adds one
    by itself); completion ids are the completion's tokens plus one EOS. Chat-message pairs are
    rendered with the tokenizer's chat template (see ``_render_chat``) and their boundary is
    checked token by token (see ``_check_boundary``).

    Truncation: the prompt keeps its last ``max_prompt_length`` tokens (a leading BOS is kept in
    front of them); then chosen and rejected are both cut to ``max_length - len(prompt)`` tokens
    from their start, so the two sides are always cut by the same rule.

    Pairs that cannot be used (an empty completion or prompt, chosen identical to rejected, before
    or after truncation) are dropped and counted in the returned stats; with ``strict`` each is a
    DataError naming its file and line instead, and so is a prompt longer than
    ``max_prompt_length`` (otherwise cut and counted). ``stats``, when given, is counted on (for
    example the one ``load_pairs`` counted the format's drops in) and returned.
    """
    if not 0 < max_prompt_length < max_length:
        raise UsageError(f"max_prompt_length ({max_prompt_length}) must be at least 1 and smaller "
                         f"than max_length ({max_length}), so every completion keeps a token")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer has no EOS token; completions must end with one")
    bos = _automatic_bos(tokenizer)

    rendered = [_render(tokenizer, sp) for sp in pairs]
    prompts = _encode(tokenizer, [r.prompt for r in rendered])
    chosens = _encode(tokenizer, [r.chosen for r in rendered])
    rejecteds = _encode(tokenizer, [r.rejected for r in rendered])
    _check_chat_boundaries(tokenizer, pairs, rendered, prompts, chosens, rejecteds)

    stats = stats if stats is not None else DataStats()
    stats.pairs_read += len(pairs)
    out: list[TokenizedPair] = []
    for sp, r, prompt, chosen, rejected in zip(pairs, rendered, prompts, chosens, rejecteds):
        if r.empty or not chosen or not rejected:
            _unusable(stats, strict, sp, "empty",
                      "chosen or rejected is empty: there is no completion to learn")
            continue
        if bos is not None and prompt[:1] != [bos]:
            prompt = [bos, *prompt]
        if not prompt:
            _unusable(stats, strict, sp, "empty_prompt",
                      "the prompt is empty: nothing precedes the completions")
            continue
        chosen, rejected = _end_with_eos(chosen, eos, r.chat), _end_with_eos(rejected, eos, r.chat)
        if chosen == rejected:
            _unusable(stats, strict, sp, "identical",
                      "chosen and rejected are identical: no preference to learn")
            continue

        if len(prompt) > max_prompt_length:
            if strict:
                raise DataError(f"the prompt has {len(prompt)} tokens, more than "
                                f"max_prompt_length {max_prompt_length}; raise "
                                f"--max-prompt-length, shorten or remove the record, "
                                f"{STRICT_HINT}", sp.path, sp.line)
            keep_bos = bos is not None and prompt[0] == bos
            head = prompt[:1] if keep_bos else []
            prompt = head + prompt[len(prompt) - (max_prompt_length - len(head)):]
            stats.prompts_truncated += 1
        budget = max_length - len(prompt)
        cut = (len(chosen) > budget) + (len(rejected) > budget)
        if cut:
            stats.completions_truncated += cut
            chosen, rejected = chosen[:budget], rejected[:budget]
            if chosen == rejected:
                _unusable(stats, strict, sp, "identical_after_truncation",
                          f"chosen and rejected are identical once cut to the {budget} tokens "
                          f"that max_length {max_length} leaves after the prompt",
                          "raise --max-length, fix or remove the record")
                continue
        out.append(TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected),
                                 f"{sp.path}:{sp.line}"))
    stats.pairs_kept += len(out)
    return out, stats


def _unusable(stats: DataStats, strict: bool, sp: SourcedPair, reason: str, problem: str,
              remedy: str = "fix or remove the record") -> None:
    """Count the pair as dropped for ``reason``, or refuse it under ``strict``."""
    if strict:
        raise DataError(f"{problem}; {remedy}, {STRICT_HINT}", sp.path, sp.line)
    stats.drop(reason)


def _check_chat_boundaries(tokenizer: Any, pairs: list[SourcedPair], rendered: list[_Rendered],
                           prompts: list[list[int]], chosens: list[list[int]],
                           rejecteds: list[list[int]]) -> None:
    """Each chat pair's whole conversation must tokenise to prompt ids + completion ids.

    Checked on the raw ids, before BOS, EOS and truncation handling, which only ever add or cut
    whole tokens at the ends. A template whose generation prompt ends inside what the tokenizer
    treats as one token (``"assistant: "`` before ``"the"``, where ``" the"`` is one token) would
    otherwise train the completion from a boundary the model never sees at generation time.
    """
    chat = [i for i, r in enumerate(rendered) if r.chat]
    if not chat:
        return
    for name, completions in (("chosen", chosens), ("rejected", rejecteds)):
        texts = [rendered[i].prompt + getattr(rendered[i], name) for i in chat]
        for i, whole in zip(chat, _encode(tokenizer, texts)):
            apart = prompts[i] + completions[i]
            if whole != apart:
                raise DataError(_boundary_problem(tokenizer, name, whole, apart, len(prompts[i])),
                                pairs[i].path, pairs[i].line)


def _boundary_problem(tokenizer: Any, name: str, whole: list[int], apart: list[int],
                      prompt_tokens: int) -> str:
    at = next((k for k, (a, b) in enumerate(zip(whole, apart)) if a != b),
              min(len(whole), len(apart)))

    def shown(ids: list[int]) -> str:
        return repr(tokenizer.convert_ids_to_tokens(ids[at])) if at < len(ids) else "the end"

    return (f"chat template: the prompt/completion boundary of {name!r} falls inside a token: "
            f"the whole conversation and the prompt ({prompt_tokens} tokens) + completion "
            f"tokenised apart first differ at token {at} ({shown(whole)} vs {shown(apart)}), so "
            "the completion would start at a shifted token; use a chat template whose generation "
            "prompt ends at a token boundary (a newline or a special token)")


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Ids without any special tokens the tokenizer would add itself; one batched call."""
    if not texts:
        return []
    # verbose=False: long texts are expected here, truncation happens afterwards, explicitly.
    return [list(ids) for ids in
            tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def _automatic_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer puts one in front of a text by itself, else None.

    Such a model was trained with a BOS first, so the prompt gets exactly one; a chat template
    that already writes it is not given a second.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids[:1] == [bos] else None


def _end_with_eos(ids: list[int], eos: int, chat: bool) -> list[int]:
    """Exactly one EOS at the end.

    Text: appended unless the text already ends with it. Chat: the template writes the EOS
    that closes the assistant turn; whatever it writes after the last one (a newline before the
    next turn) is dropped, so the model learns to stop at the EOS, not to emit template filler.
    """
    if chat and eos in ids:
        last = len(ids) - 1 - ids[::-1].index(eos)
        return ids[: last + 1]
    return ids if ids[-1:] == [eos] else [*ids, eos]


def _render(tokenizer: Any, sp: SourcedPair) -> _Rendered:
    pair = sp.pair
    if all(isinstance(v, str) for v in (pair.prompt, pair.chosen, pair.rejected)):
        return _Rendered(pair.prompt, pair.chosen, pair.rejected, chat=False,
                         empty=not pair.chosen or not pair.rejected)
    return _render_chat(tokenizer, sp)


def _render_chat(tokenizer: Any, sp: SourcedPair) -> _Rendered:
    """Chat messages through the tokenizer's chat template.

    The prompt is the rendered prompt messages with the generation prompt (the opening of the
    assistant turn); each completion is what the rendered full conversation (prompt messages +
    completion messages) adds after it. A string field counts as one message (user for the
    prompt, assistant for a completion). A template whose full rendering does not start with the
    prompt rendering has no well-defined boundary and is refused.
    """
    path, line = sp.path, sp.line
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("this pair holds chat messages, but the tokenizer has no chat template; "
                        "use a model with one or give the pair as plain text", path, line)
    prompt = _messages(sp.pair.prompt, "user", "prompt", path, line)
    chosen = _messages(sp.pair.chosen, "assistant", "chosen", path, line)
    rejected = _messages(sp.pair.rejected, "assistant", "rejected", path, line)
    prompt_text = _apply(tokenizer, prompt, path, line, generation_prompt=True)
    rests = []
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        full = _apply(tokenizer, prompt + completion, path, line, generation_prompt=False)
        if not full.startswith(prompt_text):
            raise DataError(f"chat template: the rendered conversation with {name!r} does not "
                            "start with the rendered prompt, so the prompt/completion boundary "
                            "is unknown; this template cannot be used for preference training",
                            path, line)
        rests.append(full[len(prompt_text):])
    empty = not any(m["content"] for m in chosen) or not any(m["content"] for m in rejected)
    return _Rendered(prompt_text, rests[0], rests[1], chat=True, empty=empty)


def _messages(value: Text, role: str, field: str, path: str, line: int) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        raise DataError(f"field {field!r}: expected text or a non-empty list of messages "
                        '{"role": ..., "content": ...} with string values', path, line)
    return value


def _apply(tokenizer: Any, messages: list[dict[str, str]], path: str, line: int,
           generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # a template may refuse a conversation (e.g. roles must alternate)
        raise DataError(f"chat template failed: {exc}", path, line) from None
