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
  (``demo.is_right``);
* answer form: the share whose greedy reply is one of the question's two numbers alone, right or
  wrong (``demo.in_form``): what the answer accuracy needs before the model can be right.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dpo.core.data.batching import collate
from dpo.core.data.reading import SourcedPair
from dpo.core.data.tokenization import TokenizedPair, tokenize_pairs
from dpo.core.interfaces.errors import DpoError, UsageError
from dpo.core.interfaces.plugins import Catalog
from dpo.core.model.dropout import disable_dropout
from dpo.core.model.loading import load_model, resolve_source, transformers_bars_off
from dpo.core.model.logps import batch_logps
from dpo.core.training import demo, rundir
from dpo.core.training.checkpoint import write_text_atomic
from dpo.core.training.config import RunConfig, resolve_config, with_preset
from dpo.core.training.run import run
from dpo.core.training.setup import resolve_backend

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
    answer_form: float
    replies: list[str] = field(repr=False)  # greedy replies, in the questions' order


@dataclass
class Comparison:
    questions: list[str]
    answers: list[int]  # the right answer of each question
    scores: list[ModelScore]
    path: Path | None = field(default=None, repr=False)  # where it was written

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


def answer_form(questions: Sequence[str], replies: Sequence[str]) -> float:
    """The share of ``replies`` that are one of their question's two numbers alone."""
    if len(questions) != len(replies):
        raise ValueError(f"{len(questions)} questions but {len(replies)} replies")
    if not questions:
        raise ValueError("no questions to score")
    return sum(demo.in_form(q, r) for q, r in zip(questions, replies)) / len(questions)


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
                sourced: list[SourcedPair], device: torch.device,
                trust_remote_code: bool = False) -> ModelScore:
    """Load ``spec`` and score it on the held-out questions (see the module's docstring)."""
    model, tokenizer = load_model(spec, seed, trust_remote_code=trust_remote_code)
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
                          answer_accuracy(texts, replies), answer_form(texts, replies), replies)
    finally:
        del model
        gc.collect()


def compare(models: list[tuple[str, str]], n: int, catalog: Catalog, device: torch.device,
            seed: int = 42, announce: Callable[[str], None] | None = None,
            trust_remote_code: bool = False) -> Comparison:
    """Score each ``(name, model)`` on the first ``n`` held-out demo questions, one model in
    memory at a time."""
    questions, sourced = held_out(n, catalog)
    scores = []
    for name, spec in models:
        if announce is not None:
            announce(f"scoring {name} ({spec}) on {n} held-out questions")
        scores.append(score_model(name, spec, seed, questions, sourced, device,
                                  trust_remote_code))
    return Comparison([q.text for q in questions], [q.answer for q in questions], scores)


def write_comparison(path: Path, comparison: Comparison) -> None:
    write_text_atomic(path, json.dumps(comparison.as_dict(), indent=2) + "\n")


@dataclass
class StudyRequest:
    """What ``dpo demo`` was asked: the defaults are the demo's own (its presets, the default
    model, all the held-out questions the demo's runs evaluate on)."""

    output: str = "out"
    model: str | None = None  # RunConfig's default model
    backend: str | None = None  # RunConfig's default (auto)
    steps: int | None = None  # both stages; each preset's own by default
    held_out: int = demo.EVAL_SIZE
    overwrite: bool = False
    progress: bool = True
    trust_remote_code: bool = False  # run the modelling code the starting model ships


@dataclass
class Study:
    """The study's plan: the two runs, and where the comparison goes."""

    root: Path
    sft: RunConfig
    dpo: RunConfig
    held_out: int
    backend: str

    @property
    def comparison_path(self) -> Path:
        return self.root / COMPARISON_FILE

    def models(self) -> list[tuple[str, str]]:
        """The compared models, in training order: the starting model, then each stage's."""
        return [("base", self.sft.model), ("sft", str(Path(self.sft.output) / "final")),
                ("dpo", str(Path(self.dpo.output) / "final"))]


def plan(request: StudyRequest) -> Study:
    """The two runs' configurations (the demo's presets, then what the request sets) and the
    checks of the output, before any work: every complaint comes before minutes of training."""
    if request.steps is not None and request.steps < 1:
        raise UsageError(f"--steps {request.steps}: give at least 1 step per stage")
    if not 1 <= request.held_out <= demo.EVAL_POOL:
        raise UsageError(f"--held-out {request.held_out}: the demo holds out 1 to "
                         f"{demo.EVAL_POOL} questions")
    root = rundir.check_output(request.output)
    if rundir.is_run_dir(root):
        raise UsageError(f"{request.output}: a run directory of `dpo run` or `dpo sft`; the "
                         "demo writes its two runs and the comparison into a directory of its "
                         "own: choose another --output")
    common = {"data": "demo", "model": request.model, "backend": request.backend,
              "max_steps": request.steps, "progress": request.progress,
              "trust_remote_code": request.trust_remote_code}
    sft = resolve_config(*with_preset([{**common, "objective": "sft",
                                        "output": str(root / "sft")}], "sft"))
    # DPO starts from the SFT model, which is then also its reference (a frozen copy).
    dpo = resolve_config(*with_preset([{**common, "model": str(root / "sft" / "final"),
                                        "lr": demo.DPO_AFTER_SFT_LR,
                                        "output": str(root / "dpo")}], "dpo"))
    resolve_source(sft.model)  # a model that is not there fails before any announcement
    study = Study(root, sft, dpo, request.held_out, sft.backend)
    for config in (sft, dpo):
        check_stage_output(Path(config.output), request.overwrite)
    check_comparison_target(study.comparison_path, request.overwrite)
    return study


def check_stage_output(output: Path, overwrite: bool) -> None:
    """A stage's run directory, by the rules of ``dpo run --output``: new or empty, or with
    ``overwrite`` a dpo run directory (whose run-written files alone are then replaced)."""
    rundir.check_output(output)
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise UsageError(f"{output}: already holds files (an earlier `dpo demo`?); pass "
                             "--overwrite to train it again, or choose another --output")
        if not rundir.is_run_dir(output):
            raise UsageError(f"{output}: not a dpo run directory (no {rundir.RUN_FILE}), so "
                             "--overwrite leaves it alone; choose another --output")


def check_comparison_target(path: Path, overwrite: bool) -> None:
    """``comparison.json`` is replaced only with ``overwrite``, and only when it is the
    study's own (a file of the user's under that name stays)."""
    if path.is_symlink() or path.exists() and not path.is_file():
        raise UsageError(f"{path}: exists and is not a file; choose another --output")
    if not path.exists():
        return
    if not overwrite:
        raise UsageError(f"{path}: already exists (an earlier `dpo demo`?); pass --overwrite "
                         "to run the study again, or choose another --output")
    try:
        ours = json.loads(path.read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UsageError(f"{path}: not a comparison written by `dpo demo`, so --overwrite "
                         "leaves it alone; choose another --output")


class StageFailed(DpoError):
    """A stage ended without a model to go on from (a stopping policy distrusted it)."""


def run_study(request: StudyRequest, catalog: Catalog,
              announce: Callable[[str], None] = print) -> Comparison:
    """SFT, then DPO from the SFT model, then the comparison of the three models on the
    held-out questions, written to ``OUTPUT/comparison.json``."""
    study = plan(request)
    backend = resolve_backend(study.backend, catalog)  # an unavailable one fails before training
    for number, (name, config) in enumerate((("SFT", study.sft), ("DPO", study.dpo)), start=1):
        announce(f"stage {number}/3: {name} from {config.model}, {config.max_steps} steps, "
                 f"into {config.output}")
        outcome = run(config, catalog, overwrite=request.overwrite)
        if not outcome.saved or outcome.paused:
            raise StageFailed(f"the {name} stage stopped without a model ({outcome.reason}); "
                              f"see {config.output}/metrics.jsonl")
    announce(f"stage 3/3: the three models on {study.held_out} held-out questions")
    comparison = compare(study.models(), study.held_out, catalog, backend.device(0),
                         seed=study.sft.seed, announce=announce,
                         trust_remote_code=study.sft.trust_remote_code)
    write_comparison(study.comparison_path, comparison)
    comparison.path = study.comparison_path
    return comparison
