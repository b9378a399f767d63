"""The pieces a run's setup is made of: resolving names (backend, dtype, plugin options),
checks made before anything is written, loading and tokenising the data, the speed paths and
their check, the batch order, and the reference log-probs computed before training. ``dpo
run``/``dpo sft`` (``dpo.core.training.run``), ``dpo precompute-ref`` and ``dpo eval`` share
them."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import Any, Callable

import torch

from dpo import __version__
from dpo.core.data.batching import Batch, BatchSampler, collate
from dpo.core.data.reading import load_demonstrations, load_pairs, split_eval
from dpo.core.data.stats import DataStats
from dpo.core.data.tokenization import (TokenizedPair, tokenize_demonstrations,
                                         tokenize_pairs)
from dpo.core.interfaces.backend import Backend
from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.plugins import Catalog
from dpo.core.model import lora, pathcheck
from dpo.core.model import paths as speed
from dpo.core.model.paths import Paths
from dpo.core.training import refcache, rundir
from dpo.core.training import strategy as strat
from dpo.core.training.checkpoint import load_checkpoint_state
from dpo.core.training.combination import loss_names
from dpo.core.training.config import RunConfig
from dpo.core.training.distributed import DistInfo
from dpo.core.training.loop import eval_batches
from dpo.core.training.objectives import pair_length
from dpo.core.training.refcache import RefLogps
from dpo.core.training.report import Reporter

DEMO_DATA = "demo"  # --data demo: the built-in demo dataset (dpo.core.training.demo)
AUTO_BACKENDS = ("cuda", "rocm", "xpu", "cpu")


def resolve_backend(name: str, catalog: Catalog) -> Backend:
    """The backend named ``name`` (``auto``: the first available of cuda, rocm, xpu, cpu)."""
    if name == "auto":
        for candidate in AUTO_BACKENDS:
            # dpo picks these, the user did not name them: a built-in wins a clash.
            if (candidate in catalog.backends
                    and catalog.backends.get(candidate, asked=False).is_available()):
                return catalog.backends.get(candidate, asked=False)()
        raise UsageError("--backend auto: no backend is available; see `dpo backends`")
    cls = catalog.backends.get(name)
    reason = cls.unavailable_reason()
    if reason:
        raise UsageError(f"backend {name!r} is not available here: {reason}")
    return cls()


def resolve_dtype(name: str, backend: Backend) -> torch.dtype:
    dtype = backend.default_dtype() if name == "auto" else getattr(torch, name)
    if dtype not in backend.supported_dtypes():
        names = ", ".join(str(d).removeprefix("torch.") for d in backend.supported_dtypes())
        raise UsageError(f"--dtype {name}: backend {backend.name!r} supports {names}")
    return dtype


def check_options(config: RunConfig, catalog: Catalog) -> None:
    """Every ``options`` section must belong to the selected loss, a selected stopping policy,
    or a data format (the forced one, or any installed one when the format is detected)."""
    formats = [config.format] if config.format else catalog.formats.names()
    losses = [config.loss] if config.objective == "dpo" else []  # SFT takes no loss plugin
    if losses and len(loss_names(config.loss)) > 1:  # a combination's parts take their own
        losses += loss_names(config.loss)
    selected = {*losses, *config.stop, *formats, *config.log_to}
    for plugin in config.options:
        if plugin == lora.OPTIONS_KEY:
            if not config.lora:
                raise UsageError("options given for 'lora' (-o lora.KEY=...), but the run "
                                 "trains no adapter; add --lora")
            lora.parse_options(config.plugin_options(plugin))
            continue
        if plugin not in selected:
            loss = f"loss {config.loss!r}" if losses else "no loss (sft)"
            raise UsageError(
                f"options given for {plugin!r}, which this run does not use "
                f"({loss}, stopping {', '.join(config.stop) or 'none'}, "
                f"format {config.format or 'detected'}, loggers {', '.join(config.log_to)})"
            )
    for name in formats:  # validate format options now, before anything is written
        if name in config.options:
            cls = catalog.formats.get(name)
            cls.parse_options(config.plugin_options(name))


def examples_of(objective: str, unpaired: bool = False
                ) -> tuple[str, Callable[..., Any], Callable[..., Any]]:
    """What a run of ``objective`` trains on: its examples' name, the reader and the
    tokeniser (``dpo.core.data``); ``unpaired``: a loss over unpaired examples (KTO)."""
    if unpaired:
        from dpo.core.data.reading import load_unpaired
        from dpo.core.data.unpaired import tokenize_unpaired

        return "examples", load_unpaired, tokenize_unpaired
    if objective == "sft":
        return "examples", load_demonstrations, tokenize_demonstrations
    return "pairs", load_pairs, tokenize_pairs


def holds_out(config: RunConfig) -> bool:
    """Whether the run has held-out examples: --eval-data, --eval-fraction, or the demo's own
    held-out split (``--data demo`` without either)."""
    return bool(config.eval_data or config.eval_fraction or config.data == DEMO_DATA)


def tokenized_data(config: RunConfig, catalog: Catalog, tokenizer: Any, reporter: Reporter,
                   unpaired: bool = False
                   ) -> tuple[list[Any], list[Any], DataStats, DataStats | None]:
    """The run's training and held-out examples, tokenised: pairs, demonstrations for SFT, or
    unpaired examples for an unpaired loss (``unpaired``); with their counts of what was kept,
    cut and dropped."""
    if not config.data:
        raise UsageError("--data is required: a JSONL file of prompt/chosen/rejected pairs")
    data, eval_data = config.data, config.eval_data
    if data == DEMO_DATA:
        from dpo.core.training.demo import demo_files

        data, demo_eval = (str(p) for p in demo_files())
        if not eval_data and not config.eval_fraction:
            eval_data = str(demo_eval)
    noun, read, tokenize = examples_of(config.objective, unpaired)
    load = dict(strict=config.strict, **format_options(config, catalog))
    stats, eval_stats = DataStats(), DataStats()
    records = read(data, catalog.formats, config.format, stats=stats, **load)
    eval_records = []
    if eval_data:
        eval_records = read(eval_data, catalog.formats, config.format, stats=eval_stats, **load)
    elif config.eval_fraction:
        records, eval_records = split_eval(records, config.eval_fraction, config.seed)
    lengths = (config.max_length, config.max_prompt_length)
    train, stats = tokenize(tokenizer, records, *lengths, strict=config.strict, stats=stats)
    held_out, eval_stats = tokenize(tokenizer, eval_records, *lengths, strict=config.strict,
                                    stats=eval_stats) if eval_records else ([], None)
    if not train:
        raise UsageError(f"{config.data}: no usable {noun} ({stats.as_dict()}); --strict names "
                         "the first unusable record with its line")
    reporter.info(f"data: {len(train)} training {noun}, {len(held_out)} held out; "
                  + ", ".join(f"{k} {v}" for k, v in stats.as_dict().items() if v))
    return train, held_out, stats, eval_stats


def format_options(config: RunConfig, catalog: Catalog) -> dict[str, Any]:
    """``load_pairs`` keywords: the forced format's options, or every format's for detection."""
    if config.format:
        return {"options": config.plugin_options(config.format)}
    return {"options_by_format": {name: config.plugin_options(name)
                                  for name in catalog.formats.names() if name in config.options}}


def total_steps(config: RunConfig, batches_per_epoch: int) -> int:
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(config.epochs * batches_per_epoch / config.grad_accum))


def check_world(backend: Backend, dist: DistInfo) -> None:
    """One process per accelerator device on each machine (CPU processes share the host)."""
    if dist.world_size <= 1 or backend.name == "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    count = backend.device_count()
    if local > count:
        raise UsageError(f"{local} processes on this machine, but backend {backend.name!r} has "
                         f"{count} device(s) here; use at most {count} per machine")


def check_resume_world(checkpoint: Path, dist: DistInfo, strategy: str) -> None:
    """A checkpoint resumes with the world size (and, past one process, the strategy) that wrote
    it: data shards and optimizer state depend on both."""
    saved, _ = load_checkpoint_state(checkpoint, tensors=False)
    recorded = saved.get("distributed", {"world_size": 1, "strategy": "ddp"})
    if recorded["world_size"] != dist.world_size:
        raise UsageError(f"{checkpoint} was written by {recorded['world_size']} process(es); "
                         f"resume it with {recorded['world_size']}, not {dist.world_size}")
    if dist.world_size > 1 and recorded["strategy"] != strategy:
        raise UsageError(f"{checkpoint} was written with --strategy {recorded['strategy']}; "
                         f"resume it with that, not {strategy}")


def check_ref_logps(path: str) -> None:
    """``--ref-logps``: a file to read and update, or a new one; never a file of the user's that
    is not a table of reference log-probs (it would be replaced)."""
    target = rundir.check_file_target(path, "--ref-logps")
    if target.is_file() and refcache.read(target) is None:
        raise UsageError(f"--ref-logps {path}: not a reference log-prob file (one that `dpo "
                         "precompute-ref` or a run wrote), so it is left alone; name a new file")


def check_compile(device: torch.device) -> None:
    """``--compile``: torch.compile must be able to build a kernel on this machine (inductor
    needs a C++ compiler on CPU, and with some torch versions setuptools). Tried on a tiny
    function before anything is written, so that a missing piece is one line now rather than
    a compiler traceback in the first step."""
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(2, device=device))
    except Exception as e:  # noqa: BLE001 - whatever the compiler stack raises
        inner = getattr(e, "inner_exception", None) or e  # dynamo wraps the backend's error
        lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
        detail = f"{type(inner).__name__}: {lines[0][:200]}" if lines else type(inner).__name__
        raise UsageError(f"--compile: torch.compile cannot build kernels here ({detail}); "
                         "install what it names, or run without --compile") from None


def resolve_paths(config: RunConfig, backend: Backend, model: torch.nn.Module,
                  dist: DistInfo | None = None) -> Paths:
    """The speed paths ``model`` takes in this run (``dpo.core.model.paths``): those verified for
    it, less what the run's options and the backend rule out. ``--share-prompt`` asked for
    where it cannot run is refused, with the reason."""
    dist = dist or DistInfo()
    result = speed.resolve(model, static_shapes=backend.static_shapes,
                           share_prompt=config.share_prompt,
                           share_prompt_default=backend.share_prompt_default,
                           gradient_checkpointing=config.gradient_checkpointing,
                           sharded=dist.world_size > 1 and config.strategy == "fsdp",
                           backend_name=backend.name)
    if config.share_prompt and not result.shared_prompt:
        reason = result.reasons().get("shared_prompt", "not available")
        raise UsageError(f"--share-prompt: {reason}; use --no-share-prompt")
    return result


def first_check_pairs(train: list[Any], config: RunConfig, dist: DistInfo,
                      length: Callable[[Any], int] = pair_length) -> list[Any]:
    """The examples ``check_paths`` scores: the start of the first batch of the run (rank
    0's, so that every rank checks the same examples and decides alike)."""
    sampler = make_sampler(train, config, DistInfo(world_size=dist.world_size), length)
    return [train[i] for i in sampler.batches(0)[0][:pathcheck.CHECK_PAIRS]]


def check_paths(model: torch.nn.Module, paths: Paths, pairs: list[Any],
                backend: Backend, device: torch.device, pad_token_id: int, dist: DistInfo,
                reporter: Reporter, label: str, collate_rows: Callable[..., Batch] = collate
                ) -> tuple[Paths, pathcheck.CheckReport]:
    """``dpo.core.model.pathcheck.check`` on ``pairs``, said in the log (``label``: "policy", whose
    paths are checked as training runs it, or "reference"); under several processes a path
    stays on only where every rank found it exact."""
    batch = collate_rows(pairs, pad_token_id, pad_length=backend.padded_length).to(device)
    checked, report = pathcheck.check(model, batch, paths, training=label == "policy")
    if dist.world_size > 1:
        parts: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(parts, checked.used())
        agreed = set.intersection(*(set(p) for p in parts))
        dropped = [name for name in checked.used() if name not in agreed]
        if dropped:
            checked = checked.without(dropped, "another process found it inexact")
    for name, difference in report.turned_off.items():
        reporter.warn(f"{label}: speed path {name} turned off: its log-probs differed from the "
                      f"plain path's by {difference:.3g} nats on {report.pairs} {report.unit}")
    reporter.info(f"{label} {checked.describe()}"
                  + (f"; checked against the plain path on {report.pairs} {report.unit} in "
                     f"{report.seconds:.2f} s" if paths.used() else ""))
    return checked, report


def describe_reference(config: RunConfig, requires: bool, ref_path: Path | None) -> str:
    """run.json's one line on where the reference log-probs come from."""
    if not requires:
        return ("none (reference-free loss: no reference model or log-probs; rewards/* come "
                "from the policy's own log-probs, see the loss's description)")
    model = f"--ref-model {config.ref_model}" if config.ref_model else "the initial --model"
    if config.lora and not config.ref_model:
        model = "the base model (--model, the LoRA adapter disabled)"
    if ref_path is not None:
        return f"log-probs of {model}, computed before training: {ref_path}"
    if config.lora and not config.ref_model:
        return (f"{model}: the policy itself with its adapter switched off, no copy; the same "
                "on resume")
    return (f"{model}, frozen, in memory" if config.ref_model
            else "a frozen copy of --model in memory, re-loaded from it on resume")


def make_sampler(train: list[Any], config: RunConfig, dist: DistInfo,
                 length: Callable[[Any], int] = pair_length) -> BatchSampler:
    return BatchSampler([length(e) for e in train], config.batch_size, seed=config.seed,
                        shuffle=config.shuffle, group_by_length=config.group_by_length,
                        rank=dist.rank, world_size=dist.world_size)


def first_batches(train_pairs: list[TokenizedPair], eval_pairs: list[TokenizedPair],
                  sampler: BatchSampler, config: RunConfig, dist: DistInfo
                  ) -> list[list[TokenizedPair]]:
    """This rank's batches of the first epoch and of evaluation: every pair, in the company
    the run will first score it in."""
    train = [[train_pairs[i] for i in batch] for batch in sampler.batches(0)]
    return train + (eval_batches(eval_pairs, pair_length, config.batch_size, dist)
                    if eval_pairs else [])


def precompute_reference(model: torch.nn.Module, batches: list[list[TokenizedPair]],
                         config: RunConfig,
                         backend: Backend, device: torch.device, dtype: torch.dtype,
                         pad_token_id: int, dist: DistInfo, reporter: Reporter,
                         describe: str = "", paths: Paths = speed.PLAIN
                         ) -> tuple[RefLogps, Path, int]:
    """The reference log-probs of the pairs of ``batches`` (this rank's) from
    ``config.ref_logps`` (or the cache), the missing ones computed by ``model``; the ranks'
    values are then merged."""
    share = gather_union if dist.world_size > 1 else None

    path = Path(config.ref_logps) if config.ref_logps else None
    with reporter.task("reference", sum(len(b) for b in batches)) as advance:
        table, path, computed = refcache.ensure(
            path, model, batches, backend=backend, device=device, dtype=dtype,
            pad_token_id=pad_token_id, describe=describe, paths=paths,
            trusted=frozenset(speed.trusted(model, paths)), share=share, is_main=dist.is_main,
            info=reporter.info, progress=advance)
    strat.barrier(dist)  # the file is complete before any rank goes on
    return table, path, computed


def gather_union(values: dict) -> dict:
    """Every rank's ``values`` merged (a collective)."""
    parts: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, values)
    return {k: v for part in parts for k, v in part.items()}


def check_same_tokenizer(policy: Any, reference: Any, model: str, ref: str,
                         flag: str = "--ref-model") -> None:
    """Policy and reference score the same token ids, so they must share a vocabulary."""
    if policy.get_vocab() != reference.get_vocab():
        raise UsageError(f"{flag} {ref}: its tokenizer differs from that of --model {model}; "
                         "the reference must use the same vocabulary")


def versions() -> dict[str, str]:
    import transformers

    return {"dpo-trainer": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
