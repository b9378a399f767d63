"""The architectures each speed path is verified on (``dpo.core.paths``).

One entry per transformers model type: the speed paths that ``tests/test_architectures.py``
shows to compute what the naive computation does (each sequence alone through the model's own
forward, full logits, log-softmax) on tiny random models of that type, tied and untied, with and
without a sliding window small enough to bite, with and without logit and embedding scaling,
with every dropout probability of the config at 0.1: log-probs, the DPO loss and every
gradient. The test fails if an entry claims a path that is not exact, so the table cannot drift
from the code. ``python tests/archcheck.py [TYPE ...] > probe.jsonl`` tries every path on its
own, and ``python tests/archcheck.py --suggest < probe.jsonl`` prints the entries it supports:
that is how this table was written (transformers 5.25), and how to add a type.

- ``window``: the config attributes that hold the type's attention windows (sliding, local or
  chunked attention; an int, or a list per layer). Shared-prompt groups are kept within the
  smallest.
- ``neutral_head``: config attributes that transform the logits (or the hidden state before
  the head) unless they hold the neutral value given; at another value the paths through the
  head (``chunked_head`` and those built on it) are off.
- ``neutral_embedding``: config attributes that scale the token embeddings where the model
  makes them from ids itself (and not from ``inputs_embeds``) unless they hold the neutral
  value given; at another value ``tied_buffer`` is off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Arch:
    paths: frozenset[str]
    window: tuple[str, ...] = ()
    neutral_head: tuple[tuple[str, Any], ...] = ()
    neutral_embedding: tuple[tuple[str, Any], ...] = ()


ALL = frozenset({"batched", "unmasked", "chunked_head", "tied_buffer", "shared_prompt", "packed_rows",
                 "layer_checkpointing"})


VERIFIED: dict[str, Arch] = {
    "llama": Arch(ALL),
    "mistral": Arch(ALL, window=("sliding_window",)),
}
