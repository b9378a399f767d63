"""Pairs and demonstrations to token ids: one EOS, no duplicate BOS, explicit truncation.

The prompt and each completion are tokenised separately, so the prompt/completion boundary is
exact at the token level: the completion's first token is the first token the model is asked to
predict, never one merged across the boundary. For chat messages the boundary is also checked:
the whole rendered conversation must tokenise to exactly the prompt's tokens followed by the
completion's, or the record is refused (the template's boundary falls inside a token).

Demonstrations (supervised fine-tuning, ``tokenize_demonstrations``) follow the rules of pairs
(``tokenize_pairs``) and share their code; a chat completion of several turns is tokenised turn
by turn, its assistant turns trained and the other roles' turns kept as untrained context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from dpo.core.interfaces.data_format import Text
from dpo.core.data.reading import SourcedDemonstration, SourcedPair
from dpo.core.data.stats import STRICT_HINT, DataStats
from dpo.core.interfaces.errors import DataError, UsageError

ASSISTANT = "assistant"

Sourced = Union[SourcedPair, SourcedDemonstration]


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair. Each completion ends with the EOS unless truncation cut it."""

    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    source: str = ""  # "path:line"


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one demonstration: the prompt, then the completion.

    The prompt (``ids[:prompt_length]``) is never trained. The completion is trained except for
    the ``untrained`` spans: ``[start, end)`` positions in ``ids``, all at or after
    ``prompt_length``, sorted and apart, holding what a conversation's completion says besides
    the assistant's replies (other roles' turns, the template's text between turns). The last
    token is always trained: it is the EOS ending the last reply, unless truncation cut it.
    """

    ids: tuple[int, ...]
    prompt_length: int
    untrained: tuple[tuple[int, int], ...] = ()
    source: str = ""  # "path:line"

    @property
    def trained_tokens(self) -> int:
        """How many tokens the completion trains (positions whose log-probability is learnt)."""
        return len(self.ids) - self.prompt_length - sum(end - start
                                                        for start, end in self.untrained)


@dataclass(frozen=True)
class _Rendered:
    """A pair as the strings to tokenise, before any ids exist."""

    prompt: str
    chosen: str
    rejected: str
    chat: bool
    empty: bool  # a completion with no content


@dataclass(frozen=True)
class _RenderedDemonstration:
    """A demonstration as the strings to tokenise: the prompt, then the completion in turns,
    each ``(text, reply)`` where ``reply`` marks an assistant turn (trained up to its EOS)."""

    prompt: str
    turns: tuple[tuple[str, bool], ...]
    chat: bool
    empty: bool  # no reply has any content


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
    eos, bos = _special_ids(tokenizer, max_length, max_prompt_length)
    rendered = [_render(tokenizer, sp) for sp in pairs]
    prompts = _encode(tokenizer, [r.prompt for r in rendered])
    chosens = _encode(tokenizer, [r.chosen for r in rendered])
    rejecteds = _encode(tokenizer, [r.rejected for r in rendered])
    chat = [i for i, r in enumerate(rendered) if r.chat]
    for name, completions in (("chosen", chosens), ("rejected", rejecteds)):
        _check_boundaries(tokenizer, [pairs[i] for i in chat],
                          [rendered[i].prompt + getattr(rendered[i], name) for i in chat],
                          [[prompts[i], completions[i]] for i in chat], name)

    stats = (stats if stats is not None else DataStats()).counting("pairs")
    stats.read += len(pairs)
    out: list[TokenizedPair] = []
    for sp, r, prompt, chosen, rejected in zip(pairs, rendered, prompts, chosens, rejecteds):
        if r.empty or not chosen or not rejected:
            _unusable(stats, strict, sp, "empty",
                      "chosen or rejected is empty: there is no completion to learn")
            continue
        prompt = _prompt(prompt, bos, stats, strict, sp, "completions")
        if prompt is None:
            continue
        chosen, rejected = _end_with_eos(chosen, eos, r.chat), _end_with_eos(rejected, eos, r.chat)
        if chosen == rejected:
            _unusable(stats, strict, sp, "identical",
                      "chosen and rejected are identical: no preference to learn")
            continue

        prompt = _cut_prompt(prompt, max_prompt_length, bos, strict, stats, sp)
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
    stats.kept += len(out)
    return out, stats


def tokenize_demonstrations(tokenizer: Any, demonstrations: list[SourcedDemonstration],
                            max_length: int, max_prompt_length: int, *, strict: bool = False,
                            stats: DataStats | None = None
                            ) -> tuple[list[TokenizedExample], DataStats]:
    """Tokenise, truncate and filter ``demonstrations`` by the rules of ``tokenize_pairs``;
    the survivors keep their order.

    Text: the prompt's ids (with the BOS only if the tokenizer adds one by itself), then the
    completion's plus one EOS, all of it trained. Chat messages are rendered with the
    tokenizer's chat template (see ``_render_demonstration``) and tokenised turn by turn, the
    boundaries checked token by token as for pairs (see ``_check_boundaries``): each assistant
    message of the completion is trained, from the template's text of that turn through its
    EOS (the last reply gets one appended if the template writes none); the template's filler
    after an EOS, the opening of later assistant turns (as the generation prompt opens the
    first) and the other roles' turns are ``untrained`` spans. Whatever follows the last
    reply's EOS is left out: under causal attention it changes nothing trained.

    Truncation: the prompt keeps its last ``max_prompt_length`` tokens (a leading BOS is kept
    in front of them); then the completion is cut to ``max_length - len(prompt)`` tokens from
    its start, and any untrained tokens that end it after the cut are left out.

    Dropped and counted, or with ``strict`` refused as a DataError naming the file and line:
    an empty completion or prompt (``empty``, ``empty_prompt``), a chat completion without an
    assistant message (``no_assistant``), and an example left with no trained token by the cut
    (``untrained_after_truncation``); under ``strict`` a prompt longer than
    ``max_prompt_length`` too. ``stats`` counts examples (``DataStats.counting``); when given
    (for example the one ``load_demonstrations`` counted the format's drops in) it is counted
    on and returned.
    """
    eos, bos = _special_ids(tokenizer, max_length, max_prompt_length)
    rendered = [_render_demonstration(tokenizer, sd) for sd in demonstrations]
    prompts = _encode(tokenizer, [r.prompt for r in rendered])
    flat = iter(_encode(tokenizer, [text for r in rendered for text, _ in r.turns]))
    turns = [[next(flat) for _ in r.turns] for r in rendered]
    chat = [i for i, r in enumerate(rendered) if r.chat]
    _check_boundaries(tokenizer, [demonstrations[i] for i in chat],
                      [rendered[i].prompt + "".join(text for text, _ in rendered[i].turns)
                       for i in chat],
                      [[prompts[i], *turns[i]] for i in chat])

    stats = (stats if stats is not None else DataStats()).counting("examples")
    stats.read += len(demonstrations)
    out: list[TokenizedExample] = []
    for sd, r, prompt, parts in zip(demonstrations, rendered, prompts, turns):
        nothing = _nothing_to_learn(r, parts)
        if nothing:
            _unusable(stats, strict, sd, *nothing)
            continue
        prompt = _prompt(prompt, bos, stats, strict, sd, "completion")
        if prompt is None:
            continue
        completion, untrained = _completion(parts, [reply for _, reply in r.turns], eos, r.chat)

        prompt = _cut_prompt(prompt, max_prompt_length, bos, strict, stats, sd)
        budget = max_length - len(prompt)
        if len(completion) > budget:
            stats.completions_truncated += 1
            completion, untrained = _cut_completion(completion, untrained, budget)
            if not completion:
                _unusable(stats, strict, sd, "untrained_after_truncation",
                          f"no trained token is left once the completion is cut to the {budget} "
                          f"tokens that max_length {max_length} leaves after the prompt",
                          "raise --max-length, fix or remove the record")
                continue
        start = len(prompt)
        out.append(TokenizedExample(tuple(prompt + completion), start,
                                    tuple((start + a, start + b) for a, b in untrained),
                                    f"{sd.path}:{sd.line}"))
    stats.kept += len(out)
    return out, stats


def _nothing_to_learn(r: _RenderedDemonstration,
                      parts: list[list[int]]) -> tuple[str, str] | None:
    """(reason, problem) where a demonstration's completion has no reply to learn, else None."""
    if not any(reply for _, reply in r.turns):
        return ("no_assistant",
                "the completion has no assistant message: there is no reply to learn")
    if r.empty or not any(ids for ids, (_, reply) in zip(parts, r.turns) if reply):
        return "empty", "the completion is empty: there is nothing to learn"
    return None


def _completion(parts: list[list[int]], replies: list[bool], eos: int,
                chat: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """A demonstration's completion ids from its turns' ids, and its untrained spans
    (``[start, end)`` within the completion, adjacent ones merged).

    A reply is trained through its last EOS (``_end_with_eos``: the last reply always ends with
    one; an earlier one without any is trained whole), the rest of it is untrained; other turns
    are untrained; nothing after the last reply's EOS is kept.
    """
    last = max(i for i, reply in enumerate(replies) if reply)
    ids: list[int] = []
    untrained: list[tuple[int, int]] = []
    for i, (part, reply) in enumerate(zip(parts[:last + 1], replies)):
        if not reply:
            trained = []
        elif i == last or eos in part:
            trained = _end_with_eos(part, eos, chat)
        else:
            trained = part
        ids += trained
        rest = part[len(trained):] if i < last else []
        if rest:
            if untrained and untrained[-1][1] == len(ids):
                untrained[-1] = (untrained[-1][0], len(ids) + len(rest))
            else:
                untrained.append((len(ids), len(ids) + len(rest)))
            ids += rest
    return ids, untrained


def _cut_completion(ids: list[int], untrained: list[tuple[int, int]],
                    budget: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The completion's first ``budget`` tokens and its spans within them; an untrained span
    the cut leaves at the end is left out too, so the completion still ends with a trained
    token (or is empty: nothing trained is left)."""
    ids = ids[:budget]
    untrained = [(a, min(b, budget)) for a, b in untrained if a < budget]
    if untrained and untrained[-1][1] == len(ids):
        ids = ids[:untrained.pop()[0]]
    return ids, untrained


def _special_ids(tokenizer: Any, max_length: int,
                 max_prompt_length: int) -> tuple[int, int | None]:
    """(EOS id, automatic BOS id or None), after checking the length limits."""
    if not 0 < max_prompt_length < max_length:
        raise UsageError(f"max_prompt_length ({max_prompt_length}) must be at least 1 and smaller "
                         f"than max_length ({max_length}), so every completion keeps a token")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UsageError("the tokenizer has no EOS token; completions must end with one")
    return eos, _automatic_bos(tokenizer)


def _prompt(prompt: list[int], bos: int | None, stats: DataStats, strict: bool,
            source: Sourced, completions: str) -> list[int] | None:
    """The prompt's ids with the automatic BOS in front (unless it has it already); None, the
    record counted as dropped (``empty_prompt``) or refused under ``strict``, when that leaves
    nothing to predict the ``completions``' first token from."""
    if bos is not None and prompt[:1] != [bos]:
        prompt = [bos, *prompt]
    if not prompt:
        _unusable(stats, strict, source, "empty_prompt",
                  f"the prompt is empty: nothing precedes the {completions}")
        return None
    return prompt


def _cut_prompt(prompt: list[int], max_prompt_length: int, bos: int | None, strict: bool,
                stats: DataStats, source: Sourced) -> list[int]:
    """The prompt's last ``max_prompt_length`` tokens, a leading BOS kept in front of them
    (counted as a truncated prompt); under ``strict`` a longer prompt is a DataError."""
    if len(prompt) <= max_prompt_length:
        return prompt
    if strict:
        raise DataError(f"the prompt has {len(prompt)} tokens, more than max_prompt_length "
                        f"{max_prompt_length}; raise --max-prompt-length, shorten or remove the "
                        f"record, {STRICT_HINT}", source.path, source.line)
    head = prompt[:1] if bos is not None and prompt[0] == bos else []
    stats.prompts_truncated += 1
    return head + prompt[len(prompt) - (max_prompt_length - len(head)):]


def _unusable(stats: DataStats, strict: bool, source: Sourced, reason: str, problem: str,
              remedy: str = "fix or remove the record") -> None:
    """Count the record as dropped for ``reason``, or refuse it under ``strict``."""
    if strict:
        raise DataError(f"{problem}; {remedy}, {STRICT_HINT}", source.path, source.line)
    stats.drop(reason)


def _check_boundaries(tokenizer: Any, sources: list[Sourced], wholes: list[str],
                      parts: list[list[list[int]]], name: str | None = None) -> None:
    """Each chat record's whole conversation (``wholes``) must tokenise to its parts' ids one
    after the other: the prompt's, then the completion's (a pair's ``name`` side), or a
    demonstration's completion turn by turn.

    Checked on the raw ids, before BOS, EOS and truncation handling, which only ever add or cut
    whole tokens at the ends. A template whose generation prompt ends inside what the tokenizer
    treats as one token (``"assistant: "`` before ``"the"``, where ``" the"`` is one token) would
    otherwise train the completion from a boundary the model never sees at generation time.
    """
    for source, whole, pieces in zip(sources, _encode(tokenizer, wholes), parts):
        apart = [i for piece in pieces for i in piece]
        if whole != apart:
            raise DataError(_boundary_problem(tokenizer, name, whole, apart,
                                              [len(piece) for piece in pieces]),
                            source.path, source.line)


def _boundary_problem(tokenizer: Any, name: str | None, whole: list[int], apart: list[int],
                      lengths: list[int]) -> str:
    """The message for ``whole`` != ``apart``, the concatenation of parts of ``lengths`` (the
    prompt's first): at the prompt/completion boundary, or (a demonstration) between turns."""
    at = next((k for k, (a, b) in enumerate(zip(whole, apart)) if a != b),
              min(len(whole), len(apart)))

    def shown(ids: list[int]) -> str:
        return repr(tokenizer.convert_ids_to_tokens(ids[at])) if at < len(ids) else "the end"

    differ = f"first differ at token {at} ({shown(whole)} vs {shown(apart)})"
    ends = [sum(lengths[:k + 1]) for k in range(len(lengths) - 1)]
    if next((end for end in ends if end > at), ends[0]) != ends[0]:
        return ("chat template: a boundary between the completion's turns falls inside a "
                f"token: the whole conversation and its turns tokenised apart {differ}, so a "
                "turn would start at a shifted token; use a chat template whose turns start and "
                "end at token boundaries (a newline or a special token)")
    of = "" if name is None else f" of {name!r}"
    return (f"chat template: the prompt/completion boundary{of} falls inside a token: "
            f"the whole conversation and the prompt ({lengths[0]} tokens) + completion "
            f"tokenised apart {differ}, so the completion would start at a shifted token; use a "
            "chat template whose generation prompt ends at a token boundary (a newline or a "
            "special token)")


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
    _need_chat_template(tokenizer, "pair", path, line)
    prompt = _messages(sp.pair.prompt, "user", "prompt", path, line)
    chosen = _messages(sp.pair.chosen, ASSISTANT, "chosen", path, line)
    rejected = _messages(sp.pair.rejected, ASSISTANT, "rejected", path, line)
    prompt_text = _apply(tokenizer, prompt, path, line, generation_prompt=True)
    rests = [_continuation(tokenizer, prompt + completion, prompt_text, path, line,
                           f"the rendered conversation with {name!r} does not start with the "
                           "rendered prompt, so the prompt/completion boundary is unknown; this "
                           "template cannot be used for preference training")
             for name, completion in (("chosen", chosen), ("rejected", rejected))]
    empty = not any(m["content"] for m in chosen) or not any(m["content"] for m in rejected)
    return _Rendered(prompt_text, rests[0], rests[1], chat=True, empty=empty)


def _render_demonstration(tokenizer: Any, sd: SourcedDemonstration) -> _RenderedDemonstration:
    """A demonstration as text, or as chat messages through the tokenizer's chat template.

    Chat: a string field counts as one message (user for the prompt, assistant for the
    completion). The prompt is the rendered prompt messages, with the generation prompt when
    the completion opens with an assistant message (as for pairs). Then each message of the
    completion adds what the conversation rendered up to it adds to the conversation rendered
    up to the message before: an assistant message's text is its reply, preceded by the
    generation prompt's opening of the turn as a turn of its own (not a reply) where that
    opening is not already rendered; another role's message is a turn that is not a reply. A
    template whose renderings do not each start with the one before has no well-defined turn
    boundaries and is refused.
    """
    d, path, line = sd.demonstration, sd.path, sd.line
    if isinstance(d.prompt, str) and isinstance(d.completion, str):
        return _RenderedDemonstration(d.prompt, ((d.completion, True),), chat=False,
                                      empty=not d.completion)
    _need_chat_template(tokenizer, "example", path, line)
    prompt = _messages(d.prompt, "user", "prompt", path, line)
    completion = _messages(d.completion, ASSISTANT, "completion", path, line)
    opens_with_reply = completion[0]["role"] == ASSISTANT
    prompt_text = _apply(tokenizer, prompt, path, line, generation_prompt=opens_with_reply)
    done, turns = prompt_text, []
    for k, message in enumerate(completion):
        if k and message["role"] == ASSISTANT:
            opening = _continuation(tokenizer, prompt + completion[:k], done, path, line,
                                    _turns_unknown(k, generation_prompt=True),
                                    generation_prompt=True)
            if opening:
                turns.append((opening, False))
                done += opening
        text = _continuation(tokenizer, prompt + completion[:k + 1], done, path, line,
                             _turns_unknown(k))
        if text:
            turns.append((text, message["role"] == ASSISTANT))
            done += text
    empty = not any(m["content"] for m in completion if m["role"] == ASSISTANT)
    return _RenderedDemonstration(prompt_text, tuple(turns), chat=True, empty=empty)


def _turns_unknown(k: int, generation_prompt: bool = False) -> str:
    """Why a demonstration's rendering up to (or, with the generation prompt, before) message
    ``k`` of the completion (0-based) cannot be used."""
    if k == 0:
        return ("the rendered conversation does not start with the rendered prompt, so the "
                "prompt/completion boundary is unknown; this template cannot be used for "
                "supervised fine-tuning")
    upto = (f"up to message {k} of the completion, with the generation prompt,"
            if generation_prompt else f"up to message {k + 1} of the completion")
    return (f"the rendered conversation {upto} does not start with its rendering up to message "
            f"{k}, so where that turn starts is unknown; this template cannot be used to train "
            "on a completion of several messages")


def _need_chat_template(tokenizer: Any, what: str, path: str, line: int) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"this {what} holds chat messages, but the tokenizer has no chat "
                        f"template; use a model with one or give the {what} as plain text",
                        path, line)


def _continuation(tokenizer: Any, messages: list[dict[str, str]], before: str, path: str,
                  line: int, problem: str, generation_prompt: bool = False) -> str:
    """What rendering ``messages`` adds after ``before`` (the rendering of fewer of them): a
    DataError with ``problem`` where it does not start with ``before``."""
    full = _apply(tokenizer, messages, path, line, generation_prompt)
    if not full.startswith(before):
        raise DataError(f"chat template: {problem}", path, line)
    return full[len(before):]


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
