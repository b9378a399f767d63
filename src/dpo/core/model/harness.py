"""A model loaded here, as EleutherAI's lm-eval harness sees a language model (its ``LM``
interface): the log-likelihood of a continuation given a context, the rolling log-likelihood of
a whole text, and greedy generation until a stop string, all batched on the backend's device in
its dtype (autocast over float32 weights, as training runs).

Imports ``lm_eval`` at module level: import this module only once the ``eval`` extra is known to
be there (``dpo.core.training.tasks.require_lm_eval``).

The context/continuation split follows the harness's documented rule: spaces that end the
context belong to the continuation; the continuation's tokens are those of
``tokenize(context + continuation)`` past the length of ``tokenize(context)``, so that a word
split differently at the boundary is scored as the model reads the whole text. An empty context
stands for the start of a text: the tokenizer's BOS token (EOS where it has none) is the context.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dpo.core.interfaces.backend import Backend

DEFAULT_MAX_LENGTH = 2048  # tokens a forward takes when neither model nor tokenizer says
DEFAULT_GEN_TOKENS = 256  # new tokens of generate_until when a task sets no max_gen_toks


def context_window(model: torch.nn.Module, tokenizer: Any) -> int:
    """The tokens one forward may take: the model's position limit, else the tokenizer's (when
    it is a real one, not transformers' "unbounded" placeholder), else ``DEFAULT_MAX_LENGTH``."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        return value
    return DEFAULT_MAX_LENGTH


class HarnessLM(LM):
    """``lm_eval.api.model.LM`` over ``model`` and ``tokenizer`` on ``device``.

    Requests are scored ``batch_size`` at a time, longest first (so that padding stays short
    and a batch too large for the device shows at once). The model is left in eval mode under
    ``torch.no_grad``; its weights are never changed."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, backend: Backend,
                 dtype: torch.dtype, device: torch.device, batch_size: int = 8,
                 max_length: int | None = None):
        super().__init__()
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.dtype, self._device, self.batch_size = dtype, device, batch_size
        self.max_length = max_length or context_window(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else self.eos_id
        if prefix is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand for "
                             "an empty context")
        self.prefix_id: int = prefix

    # -- tokens ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) as the model reads ``context + continuation``
        (see the module docstring)."""
        if not context:
            return [self.prefix_id], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return whole[:len(context_ids)], whole[len(context_ids):]

    # -- the harness's requests --------------------------------------------------------------

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = [self.split(*request.args) for request in requests]
        return self.score_tokens(pairs)

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """A text's log-likelihood as disjoint windows of at most ``max_length`` predicted
        tokens, each conditioned on as much of the text before it as fits (the harness's own
        window helpers), the first on the prefix token; every token is predicted once."""
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(self.encode(text), self.prefix_id,
                                                    self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self.score_tokens(windows)):
            totals[i] += logp
        return totals

    def generate_until(self, requests: list[Any]) -> list[str]:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        out: list[str] = [""] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            # Requests with different settings generate apart; a batch shares one setting.
            by_kwargs: dict[str, list[int]] = {}
            for i in chunk:
                by_kwargs.setdefault(repr(sorted(requests[i].args[1].items())), []).append(i)
            for group in by_kwargs.values():
                texts = self.generate([requests[i].args[0] for i in group],
                                      dict(requests[group[0]].args[1]))
                for i, text in zip(group, texts):
                    out[i] = text
        return out

    # -- the work ----------------------------------------------------------------------------

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context, continuation) of token ids: the summed log-probability of the
        continuation given the context, and whether each of its tokens is the model's most
        likely next token. A sequence longer than ``max_length + 1`` tokens loses its first
        tokens (those of the context first)."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        rows = []
        for context, continuation in pairs:
            tokens = (context + continuation)[-(self.max_length + 1):]
            # A continuation longer than the window keeps its last tokens, as the context does.
            rows.append((tokens[:-1], min(len(continuation), len(tokens) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(rows[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                inputs = rows[i][0]
                ids[row, :len(inputs)] = torch.tensor(inputs)
                mask[row, :len(inputs)] = 1
            logits = self.forward(ids, mask)
            for row, i in enumerate(chunk):
                inputs, n = rows[i]
                context, continuation = pairs[i]
                targets = torch.tensor(((context + continuation)[-(self.max_length + 1):])[-n:],
                                       device=logits.device)
                # The logits at position t predict token t + 1: the last n inputs predict the
                # n continuation tokens.
                logps = F.log_softmax(logits[row, len(inputs) - n:len(inputs)].float(), dim=-1)
                chosen = logps.gather(1, targets[:, None]).squeeze(1)
                greedy = bool((logps.argmax(dim=-1) == targets).all())
                results[i] = (float(chosen.sum()), greedy)
        return results

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The model's logits [N, T, V] for right-padded rows (padding never read)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.backend.autocast(self.dtype):
                logits = self.model(input_ids=ids.to(self._device),
                                    attention_mask=mask.to(self._device), use_cache=False).logits
            self.backend.materialize()
            return logits
        finally:
            self.model.train(was_training)

    def generate(self, contexts: list[str], kwargs: dict[str, Any]) -> list[str]:
        """Continuations of ``contexts`` (greedy unless the task asks to sample), each cut at
        its first stop string; generation ends once every row has met one, or EOS."""
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", DEFAULT_GEN_TOKENS))
        sample = bool(kwargs.pop("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
        options: dict[str, Any] = {"do_sample": sample}
        if sample:
            options.update({k: kwargs[k] for k in ("temperature", "top_p", "top_k") if k in kwargs})
        keep = max(self.max_length - max_new, 1)
        encoded = [(self.encode(c) or [self.prefix_id])[-keep:] for c in contexts]
        width = max(len(e) for e in encoded)
        # Left padding: every row's next token is generated at the same position.
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
        until = [s for s in until if s]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.backend.autocast(self.dtype):
                generated = self.model.generate(
                    input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                    max_new_tokens=max_new, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                    stopping_criteria=_stop_strings(self.tokenizer, until, width) if until else None, **options)
        finally:
            self.model.train(was_training)
        texts = []
        for row in generated[:, width:].tolist():
            if self.eos_id is not None and self.eos_id in row:
                row = row[:row.index(self.eos_id)]
            text = self.tokenizer.decode(row, skip_special_tokens=False)
            for s in until:
                if s and s in text:
                    text = text[:text.index(s)]
            texts.append(text)
        return texts

    # -- what the harness records -------------------------------------------------------------

    def get_model_info(self) -> dict[str, Any]:
        return {"model_class": type(self.model).__name__, "max_length": self.max_length,
                "dtype": str(self.dtype).removeprefix("torch."), "backend": self.backend.name}


def _stop_strings(tokenizer: Any, until: list[str], start: int) -> Any:
    """A stopping criterion for ``generate``: a row is done once its new text holds one of
    ``until``."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            done = [any(s in tokenizer.decode(row[start:]) for s in until)
                    for row in input_ids.tolist()]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])
