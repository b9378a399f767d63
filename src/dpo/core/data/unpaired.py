"""Unpaired examples (a prompt, one completion, a desirable/undesirable label) to tokens and
batches, for losses over unpaired data (KTO).

Each example is tokenised exactly as a demonstration (``tokenize_demonstrations``: one EOS, no
duplicate BOS, the same truncation, drops and chat handling). A batch of N examples holds 2N
rows: the N examples, then N **mismatched** rows, each example's prompt followed by the
completion of the example before it in the batch (the first takes the last one's), from which
the loss estimates the policy-to-reference KL (Ethayarajh et al. 2024, arXiv:2402.01306, §4.1;
the shift by one is how TRL builds its KL completions too).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from dpo.core.data.batching import Batch, collate_examples
from dpo.core.data.reading import SourcedDemonstration, SourcedUnpaired
from dpo.core.data.stats import DataStats
from dpo.core.data.tokenization import TokenizedExample, tokenize_demonstrations
from dpo.core.interfaces.data_format import Demonstration


@dataclass(frozen=True)
class TokenizedUnpaired:
    """Token ids of one unpaired example and its label (True: desirable)."""

    example: TokenizedExample
    label: bool

    @property
    def source(self) -> str:
        return self.example.source


@dataclass(frozen=True)
class UnpairedBatch(Batch):
    """A ``Batch`` of 2N rows (``paired`` False): N examples, then their N mismatched rows;
    ``labels`` [N] bool, True for a desirable example."""

    labels: torch.Tensor | None = None

    @property
    def num_examples(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> UnpairedBatch:
        moved = super().to(device)
        return replace(moved, labels=None if self.labels is None else self.labels.to(device))


def tokenize_unpaired(tokenizer: Any, examples: list[SourcedUnpaired], max_length: int,
                      max_prompt_length: int, *, strict: bool = False,
                      stats: DataStats | None = None
                      ) -> tuple[list[TokenizedUnpaired], DataStats]:
    """Tokenise, truncate and filter ``examples`` by the rules of ``tokenize_demonstrations``
    (the survivors keep their order), each keeping its label."""
    stats = (stats if stats is not None else DataStats()).counting("examples")
    tokenized: dict[bool, dict[str, TokenizedExample]] = {}
    # One call per label, so that a source (file:line) names one example in each: a pair
    # unpaired into two examples has one of each label.
    for label in (True, False):
        chosen = [e for e in examples if e.example.label is label]
        demos = [SourcedDemonstration(Demonstration(e.example.prompt, e.example.completion),
                                      e.path, e.line) for e in chosen]
        out, stats = tokenize_demonstrations(tokenizer, demos, max_length, max_prompt_length,
                                             strict=strict, stats=stats)
        tokenized[label] = {t.source: t for t in out}
    kept = []
    for e in examples:
        t = tokenized[e.example.label].get(f"{e.path}:{e.line}")
        if t is not None:
            kept.append(TokenizedUnpaired(t, e.example.label))
    return kept, stats


def unpaired_length(example: TokenizedUnpaired) -> int:
    """Tokens of the example's row (its mismatched row is never longer than the longer of two
    examples' rows): what length grouping sorts by."""
    return len(example.example.ids)


def mismatched(prompt_of: TokenizedExample, completion_of: TokenizedExample) -> TokenizedExample:
    """``prompt_of``'s prompt followed by ``completion_of``'s completion (its untrained spans
    moved along), cut to the longer of the two examples' rows so that it stays within the
    run's max length. At least one completion token is left: a row is longer than its prompt."""
    prompt = prompt_of.ids[:prompt_of.prompt_length]
    completion = completion_of.ids[completion_of.prompt_length:]
    shift = len(prompt) - completion_of.prompt_length
    width = max(len(prompt_of.ids), len(completion_of.ids))
    ids = (prompt + completion)[:width]
    untrained = tuple((a + shift, min(b + shift, width)) for a, b in completion_of.untrained
                      if a + shift < width)
    return TokenizedExample(ids, len(prompt), untrained, prompt_of.source)


def collate_unpaired(examples: list[TokenizedUnpaired], pad_token_id: int,
                     pad_to_multiple_of: int = 1,
                     pad_length: Callable[[int], int] | None = None) -> UnpairedBatch:
    """``examples`` and their mismatched rows (row N + i: example i's prompt with example
    i - 1's completion, cyclically) as one ``UnpairedBatch``, padded as by ``collate_examples``.
    A single example has no other completion: its mismatched row is itself."""
    if not examples:
        raise ValueError("collate_unpaired needs at least one example")
    rows = [e.example for e in examples]
    shifted = [mismatched(rows[i], rows[i - 1]) for i in range(len(rows))]
    batch = collate_examples(rows + shifted, pad_token_id, pad_to_multiple_of, pad_length)
    return UnpairedBatch(**{f: getattr(batch, f) for f in Batch.__dataclass_fields__},
                         labels=torch.tensor([e.label for e in examples], dtype=torch.bool))
