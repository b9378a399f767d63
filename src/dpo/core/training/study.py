"""``dpo demo``: the demo task as a small study of what the starting model decides.

DPO on the demo task (``dpo.core.training.demo``) teaches SmolLM2-135M-Instruct to rank the right
number above the other one, yet its greedy reply to "Which number is larger: 59 or 63?" may still
be a sentence, not a number: preference pairs that differ in one number say nothing about the
answer's form. The study trains the supervised stage first (SFT on the chosen answers), then DPO
from that model (the SFT model is also the reference), and compares the three models on the
held-out questions:

* ranking accuracy: the share of held-out pairs whose chosen answer has a higher summed
  completion log-probability than the rejected one (the model's own, no reference: the base
  model ranks too);
* answer accuracy: the share of held-out questions whose greedy reply (the prompt rendered by
  the data format, exactly as in training) is the right number, judged by the demo's checker
  (``demo.is_right``).
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dpo.core.data.batching import collate
from dpo.core.data.reading import SourcedPair
from dpo.core.data.tokenization import TokenizedPair, tokenize_pairs
from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.plugins import Catalog
from dpo.core.model.dropout import disable_dropout
from dpo.core.model.loading import load_model, transformers_bars_off
from dpo.core.model.logps import batch_logps
from dpo.core.training import demo, rundir

COMPARISON_FILE = "comparison.json"
KIND = "dpo demo comparison"  # marks comparison.json as the study's own (--overwrite replaces it)
STAGES = ("sft", "dpo")  # run directories under the study's output, in training order
MAX_NEW_TOKENS = 8  # a two-digit answer and its end-of-turn token, with room to show a sentence
SHOWN_QUESTIONS = 6  # held-out questions printed with each model's reply


@dataclass
class ModelScore:
    """One model on the held-out questions."""

    name: str  # base, sft or dpo
    model: str  # what was loaded
    ranking_accuracy: float
    answer_accuracy: float
    replies: list[str] = field(repr=False)  # greedy replies, in the questions' order


@dataclass
class Comparison:
    questions: list[str]
    answers: list[int]  # the right answer of each question
    scores: list[ModelScore]

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "held_out": len(self.questions),
            "models": [{k: v for k, v in asdict(s).items() if k != "replies"}
                       for s in self.scores],
            "questions": [
                {"question": q, "answer": a,
                 "replies": {s.name: s.replies[i] for s in self.scores}}
                for i, (q, a) in enumerate(zip(self.questions, self.answers))
            ],
        }


def answer_accuracy(questions: Sequence[str], replies: Sequence[str]) -> float:
    """The share of ``replies`` that are exactly the right number for their question (the
    demo's checker: surrounding whitespace aside, nothing but the number counts)."""
    if len(questions) != len(replies):
        raise ValueError(f"{len(questions)} questions but {len(replies)} replies")
    if not questions:
        raise ValueError("no questions to score")
    return sum(demo.is_right(q, r) for q, r in zip(questions, replies)) / len(questions)


def ranking_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """The share of pairs whose chosen log-prob is strictly above the rejected one's (a tie
    ranks nothing, so a model that cannot tell the answers apart scores 0, not 0.5)."""
    if chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError("chosen and rejected need the same, non-zero number of values")
    return float((chosen > rejected).float().mean())


def held_out(n: int, catalog: Catalog) -> tuple[list[demo.Question], list[SourcedPair]]:
    """The first ``n`` held-out demo questions and their pairs, parsed by the ``chat`` data
    format as ``--data demo`` reads them."""
    questions = demo.questions("eval", n)
    cls = catalog.formats.get("chat")
    fmt = cls(cls.parse_options({}))
    pairs = [SourcedPair(fmt.parse(q.record()), "demo-eval", line)
             for line, q in enumerate(questions, start=1)]
    return questions, pairs


@torch.no_grad()
def pair_logps(model: torch.nn.Module, pairs: list[TokenizedPair], pad_token_id: int,
               device: torch.device, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of the chosen and of the rejected side of each pair."""
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        logps, _ = batch_logps(model, collate(part, pad_token_id).to(device))
        chosen.append(logps[:len(part)].float().cpu())
        rejected.append(logps[len(part):].float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def greedy_replies(model: torch.nn.Module, tokenizer: Any, prompts: list[tuple[int, ...]],
                   device: torch.device, max_new_tokens: int = MAX_NEW_TOKENS,
                   batch_size: int = 32) -> list[str]:
    """Greedy replies to the tokenised prompts, decoded up to the end-of-sequence token.

    Prompts of the same length go through ``generate`` together and no prompt is padded, so each
    reply is what the model says to that prompt alone."""
    eos = tokenizer.eos_token_id
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    replies = [""] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            part = indices[start:start + batch_size]
            ids = torch.tensor([prompts[i] for i in part], dtype=torch.long, device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            for row, index in enumerate(part):
                new = out[row, ids.shape[1]:].tolist()
                if eos in new:
                    new = new[:new.index(eos)]
                replies[index] = tokenizer.decode(new, skip_special_tokens=True)
    return replies


def _generation_defaults_off(model: torch.nn.Module) -> None:
    """Greedy decoding as asked: a checkpoint's generation config may carry sampling settings
    (temperature, top_p) that greedy decoding would only warn about."""
    config = getattr(model, "generation_config", None)
    if config is not None:
        for name in ("temperature", "top_p", "top_k"):
            if hasattr(config, name):
                setattr(config, name, None)
        config.do_sample = False


def score_model(name: str, spec: str, seed: int, questions: list[demo.Question],
                sourced: list[SourcedPair], device: torch.device) -> ModelScore:
    """Load ``spec`` and score it on the held-out questions (see the module's docstring)."""
    model, tokenizer = load_model(spec, seed)
    try:
        disable_dropout(model)
        model.requires_grad_(False).eval().to(device)
        _generation_defaults_off(model)
        pairs, stats = tokenize_pairs(tokenizer, sourced, max_length=512, max_prompt_length=256)
        if len(pairs) != len(sourced):
            raise UsageError(f"--model {spec}: {len(sourced) - len(pairs)} of the demo's "
                             f"held-out pairs are unusable with its tokenizer ({stats.as_dict()})")
        chosen, rejected = pair_logps(model, pairs, tokenizer.pad_token_id, device)
        with transformers_bars_off():
            replies = greedy_replies(model, tokenizer, [p.prompt_ids for p in pairs], device)
        texts = [q.text for q in questions]
        return ModelScore(name, spec, ranking_accuracy(chosen, rejected),
                          answer_accuracy(texts, replies), replies)
    finally:
        del model
        gc.collect()


def compare(models: list[tuple[str, str]], n: int, catalog: Catalog, device: torch.device,
            seed: int = 42, announce: Callable[[str], None] | None = None) -> Comparison:
    """Score each ``(name, model)`` on the first ``n`` held-out demo questions, one model in
    memory at a time."""
    questions, sourced = held_out(n, catalog)
    scores = []
    for name, spec in models:
        if announce is not None:
            announce(f"scoring {name} ({spec}) on {n} held-out questions")
        scores.append(score_model(name, spec, seed, questions, sourced, device))
    return Comparison([q.text for q in questions], [q.answer for q in questions], scores)


def write_comparison(path: Path, comparison: Comparison) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(comparison.as_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
