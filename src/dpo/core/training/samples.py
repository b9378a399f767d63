"""Generations to read: what the policy says to a few fixed held-out prompts.

With ``--sample-prompts N`` a run generates a completion for each of the first ``N`` held-out
examples after every evaluation (the step-0 baseline and the last one included) and appends
them to ``samples.jsonl`` in its directory, one line per prompt per evaluation::

    {"step": 10, "index": 0, "prompt": "...", "chosen": "...", "rejected": "...",
     "completion": "..."}

``prompt`` is the prompt as the model sees it (the chat template applied where the data takes
one), decoded to text; ``chosen`` and ``rejected`` are the held-out pair's answers (for
demonstrations, ``chosen`` is the demonstration's answer and ``rejected`` is null);
``completion`` is the policy's, decoded without special tokens, up to its end-of-sequence
token or ``max_new_tokens``. ``dpo sample`` writes the same lines from any model.

An unpaired example (KTO's: one completion, labelled) has one answer, under ``chosen`` when it
is desirable and under ``rejected`` when it is undesirable (the other null; as TRL's KTO
metrics name the two labels), and its line alone carries ``"label": true`` or ``false``::

    {"step": 0, "index": 1, "prompt": "...", "chosen": null, "rejected": "...",
     "completion": "...", "label": false}

Decoding is greedy unless a temperature is given; sampling draws from a generator of its own,
seeded the same at every evaluation, so that the training's random stream is untouched and the
samples are reproducible (and differ between evaluations only because the model did).

Each prompt is generated alone (no padding): prompt, then one token at a time with the model's
key/value cache (a model that returns none recomputes the whole sequence each token). A backend
that compiles per shape (XLA) instead runs the sequence at a fixed, bucketed width every token,
with no cache: one graph per width, at the price of a full forward per token.
"""

from __future__ import annotations

import inspect
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from dpo.core.data.tokenization import TokenizedExample, TokenizedPair
from dpo.core.data.unpaired import TokenizedUnpaired
from dpo.core.interfaces.errors import UsageError
from dpo.core.training.checkpoint import write_text_atomic
from dpo.core.training.distributed import DistInfo
from dpo.core.training.layout import SAMPLES_FILE
from dpo.core.training.report import read_metrics, truncate_metrics

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class SamplePrompt:
    """One held-out prompt and its answers, as token ids and as text; ``label``: an unpaired
    example's (True: desirable), None for a pair or a demonstration."""

    prompt_ids: tuple[int, ...]
    prompt: str
    chosen: str | None
    rejected: str | None
    label: bool | None = None


@dataclass(frozen=True)
class Sample:
    """One line of ``samples.jsonl`` (``label`` only on an unpaired example's)."""

    step: int | None
    index: int
    prompt: str
    chosen: str | None
    rejected: str | None
    completion: str
    label: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        line = asdict(self)
        if self.label is None:
            del line["label"]
        return line


@dataclass(frozen=True)
class SampleSettings:
    count: int
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0: greedy
    seed: int = 0


def sample_prompts(examples: Sequence[Any], tokenizer: Any, count: int) -> list[SamplePrompt]:
    """The first ``count`` of ``examples`` (pairs, demonstrations or unpaired examples,
    tokenised as the run tokenised them) as prompts with their answers in text."""
    prompts = []
    for example in examples[:count]:
        label: bool | None = None
        if isinstance(example, TokenizedUnpaired):
            label, demo = example.label, example.example
            ids = demo.ids[:demo.prompt_length]
            answer = _text(tokenizer, demo.ids[demo.prompt_length:])
            chosen, rejected = (answer, None) if label else (None, answer)
        elif isinstance(example, TokenizedPair):
            ids = example.prompt_ids
            chosen = _text(tokenizer, example.chosen_ids)
            rejected: str | None = _text(tokenizer, example.rejected_ids)
        elif isinstance(example, TokenizedExample):
            ids = example.ids[:example.prompt_length]
            chosen, rejected = _text(tokenizer, example.ids[example.prompt_length:]), None
        else:  # pragma: no cover - the objectives train on nothing else
            raise TypeError(f"not a tokenised example: {type(example).__name__}")
        prompts.append(SamplePrompt(tuple(ids), tokenizer.decode(list(ids)), chosen, rejected,
                                    label))
    return prompts


def _text(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


# -- generation ---------------------------------------------------------------------------------

@contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode without gradients, back in its own mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class _Picker:
    """The next token from a row of logits: the argmax, or a draw at ``temperature`` from a
    CPU generator of its own (the same draws on any device, and no global RNG touched)."""

    def __init__(self, temperature: float, seed: int):
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed) if temperature > 0 else None

    def __call__(self, logits: torch.Tensor) -> int:
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], eos: int | None,
             max_new_tokens: int, device: torch.device, *, temperature: float = 0.0,
             seed: int = 0, width: Callable[[int], int] | None = None, pad: int = 0,
             agree: Callable[[int], int] | None = None) -> list[list[int]]:
    """The new token ids of each prompt's completion, without the end-of-sequence token.

    ``width``: run every token at a fixed width (``width(prompt + max_new_tokens)``, padded on
    the right with ``pad``, no cache) instead of growing the sequence with a cache: one shape
    per width, for a backend that compiles per shape. ``agree``: under several processes that
    all take part in each forward (FSDP), every rank's next token is rank 0's, so that all
    ranks run the same forwards and stop together."""
    picker = _Picker(temperature, seed)
    replies = []
    with evaluation_mode(model):
        for prompt in prompts:
            if width is None:
                steps = _cached_steps(model, prompt, device)
            else:
                steps = _fixed_width_steps(model, prompt, device,
                                           width(len(prompt) + max_new_tokens), pad)
            new: list[int] = []
            logits = next(steps)
            for count in range(max_new_tokens):
                token = picker(logits)
                if agree is not None:
                    token = agree(token)
                if token == eos:
                    break
                new.append(token)
                if count + 1 < max_new_tokens:
                    logits = steps.send(token)
            steps.close()
            replies.append(new)
    return replies


def _cached_steps(model: torch.nn.Module, prompt: Sequence[int], device: torch.device
                  ) -> Iterator[torch.Tensor]:
    """Yields the logits after the prompt, then after each token sent in: one token per
    forward with the model's cache, or the whole sequence again where it keeps none."""
    name = _cache_name(model)
    ids = list(prompt)
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    past = _cache_of(out, name)
    while True:
        token = yield out.logits[0, -1]
        ids.append(token)
        if past is not None:
            out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True,
                        **{name: past})
            past = _cache_of(out, name)
        else:
            out = model(input_ids=torch.tensor([ids], device=device), use_cache=False)


def _cache_name(model: torch.nn.Module) -> str:
    """What the model's forward calls its key/value cache: ``cache`` since transformers 5.24,
    ``past_key_values`` before (and in modelling code a model ships)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def _cache_of(out: Any, name: str) -> Any:
    """The cache an output returned (``None`` where the model keeps none), read under the
    output's own field name, not a deprecated alias."""
    fields = getattr(out, "__dataclass_fields__", {})
    if name in fields or not fields:
        return getattr(out, name, None)
    return next((getattr(out, n) for n in ("cache", "past_key_values") if n in fields), None)


def _fixed_width_steps(model: torch.nn.Module, prompt: Sequence[int], device: torch.device,
                       width: int, pad: int) -> Iterator[torch.Tensor]:
    """Like ``_cached_steps``, at one width: the positions after the last real token hold
    ``pad`` and, attention being causal, change nothing before them; the row read is chosen by a
    tensor index, so each token runs the same graph."""
    ids = list(prompt)
    while True:
        row = torch.tensor([ids + [pad] * (width - len(ids))], device=device)
        last = torch.tensor([len(ids) - 1], device=device)
        logits = model(input_ids=row, use_cache=False).logits[0].index_select(0, last)[0]
        ids.append((yield logits))


def completions(model: torch.nn.Module, tokenizer: Any, prompts: list[SamplePrompt],
                settings: SampleSettings, device: torch.device, step: int | None, *,
                width: Callable[[int], int] | None = None,
                agree: Callable[[int], int] | None = None) -> list[Sample]:
    """Each prompt's completion by ``model``, as lines of ``samples.jsonl``."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    replies = generate(model, [p.prompt_ids for p in prompts], tokenizer.eos_token_id,
                       settings.max_new_tokens, device, temperature=settings.temperature,
                       seed=settings.seed, width=width, pad=pad, agree=agree)
    return [Sample(step, i, p.prompt, p.chosen, p.rejected,
                   tokenizer.decode(reply, skip_special_tokens=True), p.label)
            for i, (p, reply) in enumerate(zip(prompts, replies))]


# -- the file -----------------------------------------------------------------------------------

def append_samples(path: Path, samples: list[Sample]) -> None:
    """Append the lines, flushed and synced at once (a crash loses no evaluation's lines but
    the one being written, and a line cut short is left out when read)."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(s.as_dict(), ensure_ascii=False) + "\n" for s in samples))
        f.flush()
        os.fsync(f.fileno())


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The lines of a samples file (a last line cut short is left out)."""
    return read_metrics(path)


def truncate_samples(path: Path, last_step: int) -> None:
    """A resumed run keeps the lines up to its checkpoint's step and writes the later ones
    again."""
    if path.is_file():
        truncate_metrics(path, last_step)


def write_samples_file(path: Path, samples: list[Sample]) -> None:
    """``samples`` as a new JSONL file, atomically."""
    write_text_atomic(path, "".join(json.dumps(s.as_dict(), ensure_ascii=False) + "\n"
                                    for s in samples))


# -- during a run -------------------------------------------------------------------------------

class RunSamples:
    """A run's generations after each evaluation, into ``OUTPUT/samples.jsonl`` (by the main
    process). Under DDP the main process generates alone with the unwrapped model; under FSDP
    every rank takes part in each forward (the model is sharded), rank 0's tokens deciding."""

    def __init__(self, prompts: list[SamplePrompt], settings: SampleSettings, output: Path,
                 tokenizer: Any, device: torch.device, dist: DistInfo, strategy: str,
                 width: Callable[[int], int] | None = None):
        self.prompts, self.settings, self.path = prompts, settings, output / SAMPLES_FILE
        self.tokenizer, self.device, self.dist = tokenizer, device, dist
        self.sharded = dist.world_size > 1 and strategy == "fsdp"
        self.width = width

    def __call__(self, policy: torch.nn.Module, step: int) -> list[Sample]:
        """The generations at ``step``, appended to the file; the main process returns them
        (for the loggers), the others an empty list."""
        from dpo.core.training import strategy as strat

        if not (self.sharded or self.dist.is_main):
            return []
        model = strat.unwrap(policy)
        with _unsharded_root(policy, self.sharded):
            samples = completions(model, self.tokenizer, self.prompts, self.settings,
                                  self.device, step, width=self.width,
                                  agree=_from_rank0(self.device) if self.sharded else None)
        if not self.dist.is_main:
            return []
        append_samples(self.path, samples)
        return samples


@contextmanager
def _unsharded_root(policy: torch.nn.Module, sharded: bool) -> Iterator[None]:
    """FSDP2: the root's own parameters (embeddings, final norm, head) gathered while the
    language model is called directly; each decoder layer gathers its own in its forward."""
    if not sharded:
        yield
        return
    policy.unshard()
    try:
        yield
    finally:
        policy.reshard()


def _from_rank0(device: torch.device) -> Callable[[int], int]:
    import torch.distributed as dist

    def agree(token: int) -> int:
        value = torch.tensor([token], dtype=torch.long, device=device)
        dist.broadcast(value, src=0)
        return int(value.item())

    return agree


def no_held_out(count: int) -> UsageError:
    """The refusal of ``--sample-prompts`` in a run that holds nothing out."""
    return UsageError(f"--sample-prompts {count}: the prompts are held-out ones, and this run "
                      "holds none out; give --eval-data or --eval-fraction")


# -- dpo sample ---------------------------------------------------------------------------------

@dataclass
class SampleRequest:
    """What ``dpo sample`` was asked. Defaults that a run decides (its seed, objective and
    length limits) come from the run that wrote the model, when there is one."""

    model: str
    data: str
    count: int = 4
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    seed: int | None = None  # sampling's; default: the run's seed, else 42
    format: str | None = None
    backend: str = "auto"
    max_length: int | None = None
    max_prompt_length: int | None = None
    strict: bool = False
    objective: str | None = None  # dpo (pairs) or sft (demonstrations); default: the run's
    trust_remote_code: bool = False


def trains_unpaired(run: dict[str, Any], catalog: Any) -> bool:
    """Whether the run's loss trains on unpaired examples (KTO): then its held-out data is
    read as such."""
    name = run.get("loss")
    return (isinstance(name, str) and name in catalog.losses.names()
            and getattr(catalog.losses.get(name), "examples", "pairs") == "unpaired")


def model_step(model: str) -> int | None:
    """The training step of the weights ``model`` names, where a run says it: a run directory or
    its ``final/`` (the run's steps), ``checkpoint-N/`` (N) or ``best/`` (its evaluation's)."""
    from dpo.core.training.layout import BEST, BEST_RECORD, FINAL, PREFIX, RUN_FILE

    path = Path(model)
    run = path if (path / RUN_FILE).is_file() else path.parent
    try:
        if path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
            return int(path.name[len(PREFIX):])
        if path.name == BEST and (path / BEST_RECORD).is_file():
            return int(json.loads((path / BEST_RECORD).read_text())["step"])
        if (run / RUN_FILE).is_file() and (run == path or path.name == FINAL):
            steps = json.loads((run / RUN_FILE).read_text()).get("steps")
            return steps if isinstance(steps, int) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def check_samples_output(output: str) -> Path:
    """``--output`` of ``dpo sample``: a new file in a directory that exists (nothing there
    is overwritten), checked before any model loads."""
    path = Path(output).expanduser()
    if path.exists() or path.is_symlink():
        raise UsageError(f"--output {output}: already exists; name a new file (nothing is "
                         "overwritten)")
    if not path.parent.is_dir():
        raise UsageError(f"--output {output}: {path.parent} is not a directory; create it "
                         "first or name a file in an existing one")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output {output}: {path.parent} is not writable by this user")
    return path


def sample_request(request: SampleRequest, catalog: Any,
                   note: Callable[[str], None] = lambda message: None) -> list[Sample]:
    """The model's completions of the first ``request.count`` prompts of ``request.data``,
    as a run with ``--sample-prompts`` writes them (the same prompts, tokenised with the run's
    limits, the same decoding and seed); ``note`` hears what was adjusted."""
    from dpo.core.model.dropout import disable_dropout
    from dpo.core.model.loading import load_model, resolve_source
    from dpo.core.training.evaluation import EvalRequest, find_run_config, held_out, model_dir
    from dpo.core.training.setup import DEMO_DATA, resolve_backend

    if request.count < 1:
        raise UsageError(f"-n {request.count}: ask for at least one prompt")
    if request.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {request.max_new_tokens}: generate at least one "
                         "token")
    if not request.temperature >= 0:
        raise UsageError(f"--temperature {request.temperature}: give 0 (greedy) or more")
    if request.objective not in (None, "dpo", "sft"):
        raise UsageError(f"--objective {request.objective}: choose dpo or sft")
    run = find_run_config(request.model) or {}
    objective = request.objective or run.get("objective", "dpo")
    seed = request.seed if request.seed is not None else run.get("seed", 42)
    backend = resolve_backend(request.backend, catalog)
    spec = model_dir(request.model)
    resolve_source(spec)
    model, tokenizer = load_model(spec, run.get("seed", seed),
                                  trust_remote_code=request.trust_remote_code)
    data = request.data
    if data == DEMO_DATA:  # the demo's held-out questions, as a run on --data demo holds out
        from dpo.core.training.demo import demo_files

        data = str(demo_files()[1])
    reading = EvalRequest(model=request.model, data=data, format=request.format,
                          max_length=request.max_length,
                          max_prompt_length=request.max_prompt_length, strict=request.strict)
    examples, _ = held_out(reading, run, catalog, tokenizer, objective,
                           unpaired=objective == "dpo" and trains_unpaired(run, catalog))
    if len(examples) < request.count:
        noun = "pairs" if objective == "dpo" and examples and isinstance(
            examples[0], TokenizedPair) else "examples"
        note(f"-n {request.count}: {request.data} has {len(examples)} usable {noun}; sampling "
             "all of them")
    prompts = sample_prompts(examples, tokenizer, request.count)
    device = backend.device(0)
    disable_dropout(model)
    model.requires_grad_(False).eval().to(device)
    backend.configure_model(model)
    settings = SampleSettings(len(prompts), request.max_new_tokens, request.temperature, seed)
    width = backend.padded_length if backend.static_shapes else None
    return completions(model, tokenizer, prompts, settings, device, model_step(request.model),
                       width=width)
