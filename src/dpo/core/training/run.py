"""From a RunConfig and the plugin catalog to a finished run.

Everything that can be wrong with the input (names, options, data, output directory) is checked
before anything is written, so bad input leaves nothing half-written on disk.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dpo import __version__
from dpo.core.model.activations import checkpoint_layers
from dpo.core.interfaces.backend import Backend
from dpo.core.training.checkpoint import (
    has_manifest,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_state,
    remove_checkpoints,
    restore_rng_states,
    resumable_checkpoint,
    write_json_atomic,
)
from dpo.core.training import refcache
from dpo.core.training.config import RunConfig
from dpo.core.training.refcache import RefLogps
from dpo.core.data.batching import BatchSampler
from dpo.core.data.reading import load_pairs, split_eval
from dpo.core.data.stats import DataStats
from dpo.core.data.tokenization import TokenizedPair, tokenize_pairs
from dpo.core.training.distributed import DistInfo
from dpo.core.model.dropout import disable_dropout
from dpo.core.interfaces.errors import DpoError, Interrupted, UsageError
from dpo.core.model.flops import FlopCounter
from dpo.core.training.loop import (
    Outcome,
    Settings,
    Trainee,
    TrainState,
    eval_batches,
    plugin_call,
    train,
)
from dpo.core.model import pathcheck
from dpo.core.model import paths as speed
from dpo.core.data.batching import collate
from dpo.core.model.paths import Paths
from dpo.core.model.loading import load_model, resolve_source, transformers_bars_off
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.report import METRICS_FILE, Reporter, truncate_metrics
from dpo.core.training import rundir
from dpo.core.training.schedule import build_scheduler, set_peak_lr
from dpo.core.training import strategy as strat

RUN_FILE = rundir.RUN_FILE
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
    selected = {config.loss, *config.stop, *formats}
    for plugin in config.options:
        if plugin not in selected:
            raise UsageError(
                f"options given for {plugin!r}, which this run does not use "
                f"(loss {config.loss!r}, stopping {', '.join(config.stop) or 'none'}, "
                f"format {config.format or 'detected'})"
            )
    for name in formats:  # validate format options now, before anything is written
        if name in config.options:
            cls = catalog.formats.get(name)
            cls.parse_options(config.plugin_options(name))


def _lengths(pairs: list[TokenizedPair]) -> list[int]:
    return [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]


def _tokenized(config: RunConfig, catalog: Catalog, tokenizer: Any, reporter: Reporter):
    if not config.data:
        raise UsageError("--data is required: a JSONL file of prompt/chosen/rejected pairs")
    data, eval_data = config.data, config.eval_data
    if data == DEMO_DATA:
        from dpo.core.training.demo import demo_files

        data, demo_eval = (str(p) for p in demo_files())
        if not eval_data and not config.eval_fraction:
            eval_data = str(demo_eval)
    load = dict(strict=config.strict, **format_options(config, catalog))
    stats, eval_stats = DataStats(), DataStats()
    pairs = load_pairs(data, catalog.formats, config.format, stats=stats, **load)
    eval_sourced = []
    if eval_data:
        eval_sourced = load_pairs(eval_data, catalog.formats, config.format, stats=eval_stats, **load)
    elif config.eval_fraction:
        pairs, eval_sourced = split_eval(pairs, config.eval_fraction, config.seed)
    lengths = (config.max_length, config.max_prompt_length)
    train_pairs, stats = tokenize_pairs(tokenizer, pairs, *lengths, strict=config.strict, stats=stats)
    eval_pairs, eval_stats = tokenize_pairs(tokenizer, eval_sourced, *lengths, strict=config.strict,
                                            stats=eval_stats) if eval_sourced else ([], None)
    if not train_pairs:
        raise UsageError(f"{config.data}: no usable pairs ({stats.as_dict()}); --strict names "
                         "the first unusable record with its line")
    reporter.info(f"data: {len(train_pairs)} training pairs, {len(eval_pairs)} held out; "
                  + ", ".join(f"{k} {v}" for k, v in stats.as_dict().items() if v))
    return train_pairs, eval_pairs, stats, eval_stats


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


def run(config: RunConfig, catalog: Catalog, *, resume: bool = False, overwrite: bool = False,
        reporter: Reporter | None = None,
        on_save: Callable[[Path], None] | None = None) -> Outcome:
    """Validate, set up and train. ``resume`` continues from the newest checkpoint in
    ``config.output`` (from step 0 when the run wrote none yet)."""
    dist = DistInfo.from_env()
    output = Path(config.output)
    reporter = reporter or Reporter(output, enabled=dist.is_main, progress=config.progress)
    taken = _Taken(output, dist.is_main)
    try:
        outcome = _run(config, catalog, dist, output, reporter, resume, overwrite, on_save, taken)
        # Every rank is past its last collective before any rank tears the group down: a rank
        # that destroys it while another still has gloo work in flight can abort at exit.
        strat.barrier(dist)
        return outcome
    except KeyboardInterrupt:
        exc = Interrupted(taken.interrupted())
        taken.end(f"interrupted: {exc}")
        raise exc from None
    except Interrupted as exc:
        taken.end(f"interrupted: {exc}")
        raise
    except DpoError as exc:
        taken.end(f"failed: {exc}")
        raise
    except BaseException as exc:
        taken.end(f"failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        strat.destroy_process_group()
        gc.collect()  # wrapped models holding the group go now, not at interpreter exit


class _Taken:
    """The run directory once this process has taken it: ``run.json`` is written first, and
    whatever ends the run (an error, Ctrl-C) is recorded there as its status."""

    def __init__(self, output: Path, is_main: bool):
        self.output, self.is_main = output, is_main
        self.record: dict[str, Any] | None = None

    def write(self, record: dict[str, Any]) -> None:
        self.record = record
        if self.is_main:
            write_json_atomic(self.output / RUN_FILE, record)

    def end(self, status: str) -> None:
        if self.record is None or self.record.get("status") != "running":
            return
        try:
            self.write({**self.record, "status": status,
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except OSError:  # e.g. the disk is full: the error being raised says more
            pass

    def interrupted(self) -> str:
        if self.record is None:
            return "interrupted before anything was written"
        return "interrupted" + rundir.resume_hint(self.output, latest_checkpoint(self.output))


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


def _run(config: RunConfig, catalog: Catalog, dist: DistInfo, output: Path, reporter: Reporter,
         resume: bool, overwrite: bool, on_save: Callable[[Path], None] | None,
         taken: _Taken) -> Outcome:

    # 1. Names and options: cheap checks first.
    backend = resolve_backend(config.backend, catalog)
    check_world(backend, dist)
    memory_note = backend.save_memory() if config.gradient_checkpointing else None
    device = backend.device(dist.local_rank)
    # Joined first, so that no rank writes before every rank has checked the input (below).
    strat.init_process_group(dist, backend.collective, device)
    dtype = resolve_dtype(config.dtype, backend)
    check_options(config, catalog)
    # Named by a flag or config file now, or a default (a resumed run's recorded names count
    # as defaults): where two plugins register a name, only a named one is an error.
    named = set() if resume else config.model_fields_set
    loss_cls = catalog.losses.get(config.loss, asked="loss" in named)
    loss = plugin_call(loss_cls, "__init__", loss_cls,
                       loss_cls.parse_options(config.plugin_options(config.loss)))
    policies = {}
    for name in config.stop:
        cls = catalog.stopping.get(name, asked="stop" in named)
        policies[name] = plugin_call(cls, "__init__", cls,
                                     cls.parse_options(config.plugin_options(name)))
    if config.format:
        catalog.formats.get(config.format)
    watched = [m for p in policies.values() for m in plugin_call(p, "watches()", p.watches)
               if m.startswith("eval/")]
    if watched and not (config.eval_data or config.eval_fraction):
        raise UsageError(f"stopping on {watched[0]} needs held-out pairs: give --eval-data or "
                         "--eval-fraction")
    if config.ref_model and not loss.requires_reference:
        raise UsageError(f"--ref-model given, but loss {loss.name!r} uses no reference model")
    if config.compile:
        check_compile(device)
    sources = {"model": resolve_source(config.model).describe()}
    if config.ref_model:
        sources["ref_model"] = resolve_source(config.ref_model).describe()
    if config.ref_logps and loss.requires_reference and config.precompute_ref:
        check_ref_logps(config.ref_logps)

    # 2. The output directory and the checkpoint to resume from.
    rundir.check_output(config.output, "--resume" if resume else "--output")
    checkpoint = None
    previous: dict[str, Any] = {}
    if resume:
        if not rundir.is_run_dir(output) and latest_checkpoint(output) is None:
            raise UsageError(f"{output}: not a dpo run directory (no {RUN_FILE}); start a run "
                             f"there with --output {output}")
        with contextlib.suppress(UsageError):  # a damaged run.json is rewritten below
            previous = rundir.read_record(output)
        if rundir.nothing_to_resume(previous, output, config.model_dump()):
            raise UsageError(f"{output}: the run is already complete ({previous['status']}); "
                             f"its model is {output / 'final'}")
        # The newest checkpoint that verifies against its manifest; damaged newer ones are
        # said and kept (the run replaces each when it gets to its step).
        checkpoint, damaged = resumable_checkpoint(output)
        if checkpoint is None and damaged:
            listed = "; ".join(f"{p.name} ({reason})" for p, reason in damaged)
            raise UsageError(f"{output}: no checkpoint to resume from: every one is damaged: "
                             f"{listed}; start over with --overwrite")
        if checkpoint is None and rundir.finished(previous, output):
            raise UsageError(f"{output}: the run is complete and its checkpoints were removed "
                             "(--no-keep-checkpoints), so it cannot be extended; start a new run "
                             f"from its model with --model {output / 'final'}")
        if checkpoint is None:
            reporter.info(f"{output}: no checkpoint yet; starting the run again from step 0")
        else:
            for path, reason in damaged:
                reporter.warn(f"{path.name} is damaged ({reason}); resuming from "
                              f"{checkpoint.name}")
            if not has_manifest(checkpoint):
                reporter.info(f"{checkpoint.name} has no manifest (written by an earlier "
                              "version): its files load, but their contents cannot be verified")
            check_resume_world(checkpoint, dist, config.strategy)
    elif output.exists() and any(output.iterdir()):
        if not overwrite:
            raise UsageError(f"{output}: already holds files; resume with --resume {output}, "
                             "or pass --overwrite to start over there")
        if not rundir.is_run_dir(output):
            raise UsageError(f"{output}: not a dpo run directory (no {RUN_FILE}), so "
                             "--overwrite leaves it alone; choose another --output")

    # 3. Model and data (the reference is always re-loaded from --model, never from a checkpoint).
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model, config.seed)
    train_pairs, eval_pairs, stats, eval_stats = _tokenized(config, catalog, tokenizer, reporter)
    reference = None
    if loss.requires_reference and config.ref_model:
        reference, ref_tokenizer = load_model(config.ref_model, config.seed)
        check_same_tokenizer(tokenizer, ref_tokenizer, config.model, config.ref_model)
        reference.requires_grad_(False).eval()
    elif loss.requires_reference and not config.precompute_ref:
        reference = copy.deepcopy(model).requires_grad_(False).eval()
    # With precomputed reference log-probs, the reference scores every pair once below and is
    # then dropped; without --ref-model it is the policy itself before any update (on resume,
    # the weights loaded from --model here, before the checkpoint's replace them).
    ref_source = None
    if loss.requires_reference and config.precompute_ref:
        ref_source, reference = (reference if reference is not None else model), None
    if checkpoint is not None:
        from dpo.core.model.loading import causal_lm

        with transformers_bars_off():
            model = causal_lm(checkpoint)
    sharded = dist.world_size > 1 and config.strategy == "fsdp"
    if sharded:
        strat.decoder_layers(model)  # a model FSDP cannot shard is refused before any write

    paths = resolve_paths(config, backend, model, dist)
    if (config.gradient_checkpointing and not paths.layer_checkpointing
            and not getattr(model, "supports_gradient_checkpointing", False)):
        raise UsageError(f"--gradient-checkpointing: {type(model).__name__} supports no "
                         "activation checkpointing (transformers' own or ours: "
                         f"{paths.reasons().get('layer_checkpointing')}); run without it")
    ref_paths = None
    if reference is not None and config.ref_model:
        ref_paths = resolve_paths(config, backend, reference, dist)
    elif ref_source is not None and ref_source is not model:
        ref_paths = resolve_paths(config, backend, ref_source, dist)

    # Nothing is written above this line.
    strat.barrier(dist)  # every rank has checked its input
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if dist.is_main:
        if checkpoint is None and output.is_dir() and rundir.is_run_dir(output):
            removed = rundir.clear_run(output)  # --overwrite, or a resume from nothing
            if removed:
                reporter.info(f"starting over in {output}: removed what the run there wrote "
                              f"({', '.join(p.name for p in removed)})")
        output.mkdir(parents=True, exist_ok=True)
    strat.barrier(dist)
    # The directory is this run's from here on: run.json marks it, whatever happens next.
    started, resumes = now, []
    if checkpoint is not None:
        started = previous.get("started", now)
        resumes = [*previous.get("resumes", []), {"at": now, "from": checkpoint.name}]
    taken.write({"status": "running", "config": config.model_dump(), "started": started,
                 "resumes": resumes, "resumed_from": str(checkpoint) if checkpoint else None})

    for m in (model, reference, ref_source):
        if m is not None:
            disable_dropout(m)
            m.to(device)
            backend.configure_model(m)  # before the optimizer sees the parameters
    sampler = make_sampler(train_pairs, config, dist)
    # Before anything is scored: the paths' log-probs against the plain path's, on real pairs.
    check_pairs = first_check_pairs(train_pairs, config, dist)
    paths, checked = check_paths(model, paths, check_pairs, backend, device,
                                 tokenizer.pad_token_id, dist, reporter, "policy")
    ref_checked = None
    if ref_paths is not None:
        scorer = reference if reference is not None else ref_source
        ref_paths, ref_checked = check_paths(scorer, ref_paths, check_pairs, backend, device,
                                             tokenizer.pad_token_id, dist, reporter, "reference")
    ref_table = ref_path = None
    ref_record = None

    def score_reference(scorer: torch.nn.Module) -> None:
        nonlocal ref_table, ref_path, ref_record
        started = time.perf_counter()
        ref_table, ref_path, computed = precompute_reference(
            scorer, first_batches(train_pairs, eval_pairs, sampler, config, dist),
            config, backend, device, dtype,
            tokenizer.pad_token_id, dist, reporter,
            describe=sources.get("ref_model", sources["model"]),
            paths=paths if ref_paths is None else ref_paths)
        ref_record = {"file": str(ref_path), "pairs_scored": computed,
                      "seconds": round(time.perf_counter() - started, 3)}

    # A reference that is the policy itself, in one process, scores after the backend's last
    # pass over the policy (e.g. ipex.optimize), so that step 1 runs the very same kernels;
    # a separate reference (or one about to be sharded) scores now and is dropped.
    score_later = ref_source is model and dist.world_size == 1
    if ref_source is not None and not score_later:
        score_reference(ref_source)
        ref_source = None  # the reference's weights go now (a separate copy only on resume)
        gc.collect()
    if config.gradient_checkpointing and paths.layer_checkpointing:
        checkpoint_layers(model, on_replay=backend.release_memory)
    elif config.gradient_checkpointing:
        # Ours is not verified for this model: transformers' own (which turns the key/value
        # cache off, so resolve_paths left the shared prompt off). Non-reentrant: works with
        # inputs that need no grad and under DDP/FSDP. transformers renamed the method (5.24).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if config.compile:
        for layer in strat.decoder_layers(model):
            layer.compile()
    if dist.world_size > 1:
        # Wrapped before the optimizer is built: FSDP2 replaces the parameters by shards.
        reference = strat.wrap_reference(reference, config.strategy, dist,
                                         paths if ref_paths is None else ref_paths)
        trained = strat.wrap_policy(model, config.strategy, dist, device, paths)
    else:
        trained = model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
                                  **backend.optimizer_options())
    if dist.world_size > 1:
        trained, optimizer = backend.prepare(trained, optimizer, dtype)
    else:
        model, optimizer = backend.prepare(model, optimizer, dtype)
        trained = model
    if ref_source is not None:  # score_later
        ref_source = None
        score_reference(model)
    steps = total_steps(config, len(sampler))
    warmup = config.warmup_steps or round(config.warmup_ratio * steps)
    scheduler = build_scheduler(optimizer, config.scheduler, warmup, steps)

    state = TrainState()
    if checkpoint is not None:
        saved, tensors = load_checkpoint_state(checkpoint)
        state = TrainState(**saved["train"])
        strat.load_optimizer_state(trained, optimizer, tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        if set_peak_lr(scheduler, config.lr):
            reporter.info(f"peak learning rate now {config.lr:g} (--lr), from step {state.step}")
        decay = optimizer.param_groups[0]  # the matrices' group; biases and norms take none
        if decay["weight_decay"] != config.weight_decay:
            decay["weight_decay"] = config.weight_decay
            reporter.info(f"weight decay now {config.weight_decay:g} (--weight-decay), from "
                          f"step {state.step}")
        for name, policy in policies.items():
            plugin_call(policy, "load_state_dict()", policy.load_state_dict,
                        saved["policies"].get(name, {}))
        backend.set_rng_state(restore_rng_states(tensors["rng"]))
        if dist.is_main:
            truncate_metrics(output / METRICS_FILE, state.step)
        reporter.info(f"resuming from {checkpoint} (step {state.step})")

    record = {
        "status": "running",
        "config": config.model_dump(),
        "resolved": {"backend": backend.name, "device": backend.describe(), "dtype": str(dtype),
                     "total_steps": steps, "warmup_steps": warmup, "world_size": dist.world_size,
                     "strategy": config.strategy if dist.world_size > 1 else None,
                     "options": {loss.name: loss.options.model_dump(mode="json"),
                                 **{n: p.options.model_dump(mode="json") for n, p in policies.items()}},
                     "models": sources,
                     "reference": describe_reference(config, loss.requires_reference, ref_path),
                     "reference_logps": ref_record, "share_prompt": paths.shared_prompt,
                     "packed_rows": paths.packed_rows,
                     "paths": {**paths.record(), "check": checked.record()},
                     "reference_paths": (None if ref_paths is None else
                                         {**ref_paths.record(), "check": ref_checked.record()}),
                     "memory": memory_note},
        "data": {"train": stats.as_dict(), "eval": eval_stats.as_dict() if eval_stats else None},
        "versions": versions(),
        "started": started,
        "resumes": resumes,
        "resumed_from": str(checkpoint) if checkpoint else None,
    }
    taken.write(record)
    reporter.info(f"training {config.model} on {backend.describe()} ({dtype}), loss {loss.name}, "
                  f"{steps} steps, {sum(p.numel() for p in model.parameters()):,} parameters")
    if memory_note:
        reporter.info(f"memory: {memory_note}")

    trainee = Trainee(policy=trained, reference=reference, tokenizer=tokenizer, backend=backend,
                      device=device, loss=loss, policies=policies, optimizer=optimizer,
                      scheduler=scheduler, train_pairs=train_pairs, eval_pairs=eval_pairs,
                      sampler=sampler, output=output, dist=dist, strategy=config.strategy,
                      ref_table=ref_table, flops=FlopCounter.of(model))
    settings = Settings(total_steps=steps, grad_accum=config.grad_accum,
                        max_grad_norm=config.max_grad_norm, eval_steps=config.eval_steps,
                        save_steps=config.save_steps, save_total_limit=config.save_total_limit,
                        dtype=dtype, batch_size=config.batch_size,
                        eval_at_start=config.eval_at_start, paths=paths, ref_paths=ref_paths,
                        config=config.model_dump(mode="json"),
                        # Measured on the vs-TRL batches: group by group lowers the peak
                        # without checkpointing (4.23 -> 4.09 GiB) but raises it with it
                        # (2.98 -> 3.34 GiB: the checkpoints are small, and interleaving
                        # the groups' passes spreads the heap), so only without.
                        backward_by_group=(paths.shared_prompt
                                           and not config.gradient_checkpointing))
    outcome = train(trainee, settings, state, reporter, on_save=on_save)
    status = f"stopped by {outcome.stopped_by}: {outcome.reason}" if outcome.stopped_by else "completed"
    record.update({"status": status, "steps": outcome.step, "final": outcome.train_metrics,
                   "final_eval": outcome.eval_metrics, "initial_eval": outcome.initial_eval or None,
                   "restored_best_from_step": outcome.restored_step,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    taken.write(record)
    if outcome.saved and dist.is_main:
        if config.keep_checkpoints:
            kept = list_checkpoints(output)[-1:]
            if kept:
                size = sum(f.stat().st_size for f in kept[0].rglob("*") if f.is_file())
                reporter.info(f"kept {kept[0].name} ({size / 2**30:.2f} GiB) to extend the run "
                              f"with --resume {output} --max-steps N; --no-keep-checkpoints "
                              "removes checkpoints once a run is complete")
        else:
            removed = remove_checkpoints(output, reporter.warn)
            if removed:
                reporter.info(f"removed {', '.join(p.name for p in removed)}: the run is "
                              f"complete and its model is in {output / 'final'}")
    if outcome.stopped_by:
        reporter.warn(f"stopped by {outcome.stopped_by} at step {outcome.step}: {outcome.reason}")
    final_label = (f"eval (best, step {outcome.restored_step})" if outcome.restored_step is not None
                   else f"eval (step {outcome.step})")
    reporter.summary(f"{status} after {outcome.step} steps -> {output}", outcome.train_metrics,
                     outcome.eval_metrics, before=outcome.initial_eval, eval_label=final_label)
    return outcome


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


def first_check_pairs(train_pairs: list[TokenizedPair], config: RunConfig, dist: DistInfo
                      ) -> list[TokenizedPair]:
    """The pairs ``check_paths`` scores: the start of the first batch of the run (rank 0's,
    so that every rank checks the same pairs and decides alike)."""
    sampler = make_sampler(train_pairs, config, DistInfo(world_size=dist.world_size))
    return [train_pairs[i] for i in sampler.batches(0)[0][:pathcheck.CHECK_PAIRS]]


def check_paths(model: torch.nn.Module, paths: Paths, pairs: list[TokenizedPair],
                backend: Backend, device: torch.device, pad_token_id: int, dist: DistInfo,
                reporter: Reporter, label: str) -> tuple[Paths, pathcheck.CheckReport]:
    """``dpo.core.model.pathcheck.check`` on ``pairs``, said in the log (``label``: "policy", whose
    paths are checked as training runs it, or "reference"); under several processes a path
    stays on only where every rank found it exact."""
    batch = collate(pairs, pad_token_id, pad_length=backend.padded_length).to(device)
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
                      f"plain path's by {difference:.3g} nats on {report.pairs} pairs")
    reporter.info(f"{label} {checked.describe()}"
                  + (f"; checked against the plain path on {report.pairs} pairs in "
                     f"{report.seconds:.2f} s" if paths.used() else ""))
    return checked, report


def describe_reference(config: RunConfig, requires: bool, ref_path: Path | None) -> str:
    """run.json's one line on where the reference log-probs come from."""
    if not requires:
        return "none (reference-free loss)"
    model = f"--ref-model {config.ref_model}" if config.ref_model else "the initial --model"
    if ref_path is not None:
        return f"log-probs of {model}, computed before training: {ref_path}"
    return (f"{model}, frozen, in memory" if config.ref_model
            else "a frozen copy of --model in memory, re-loaded from it on resume")


def make_sampler(train_pairs: list[TokenizedPair], config: RunConfig, dist: DistInfo
                 ) -> BatchSampler:
    return BatchSampler(_lengths(train_pairs), config.batch_size, seed=config.seed,
                        shuffle=config.shuffle, group_by_length=config.group_by_length,
                        rank=dist.rank, world_size=dist.world_size)


def first_batches(train_pairs: list[TokenizedPair], eval_pairs: list[TokenizedPair],
                  sampler: BatchSampler, config: RunConfig, dist: DistInfo
                  ) -> list[list[TokenizedPair]]:
    """This rank's batches of the first epoch and of evaluation: every pair, in the company
    the run will first score it in."""
    train = [[train_pairs[i] for i in batch] for batch in sampler.batches(0)]
    return train + (eval_batches(eval_pairs, config.batch_size, dist) if eval_pairs else [])


def precompute_reference(model: torch.nn.Module, batches: list[list[TokenizedPair]],
                         config: RunConfig,
                         backend: Backend, device: torch.device, dtype: torch.dtype,
                         pad_token_id: int, dist: DistInfo, reporter: Reporter,
                         describe: str = "", paths: Paths = speed.PLAIN
                         ) -> tuple[RefLogps, Path, int]:
    """The reference log-probs of the pairs of ``batches`` (this rank's) from
    ``config.ref_logps`` (or the cache), the missing ones computed by ``model``; the ranks'
    values are then merged."""
    share = None
    if dist.world_size > 1:

        def share(values: dict) -> dict:
            parts: list[Any] = [None] * dist.world_size
            torch.distributed.all_gather_object(parts, values)
            return {k: v for part in parts for k, v in part.items()}

    path = Path(config.ref_logps) if config.ref_logps else None
    with reporter.task("reference", sum(len(b) for b in batches)) as advance:
        table, path, computed = refcache.ensure(
            path, model, batches, backend=backend, device=device, dtype=dtype,
            pad_token_id=pad_token_id, describe=describe, paths=paths,
            trusted=frozenset(speed.trusted(model, paths)), share=share, is_main=dist.is_main,
            info=reporter.info, progress=advance)
    strat.barrier(dist)  # the file is complete before any rank goes on
    return table, path, computed


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


def recorded_config(output: Path) -> dict[str, Any]:
    """The configuration a run in ``output`` was started with: from ``run.json``, or, when that
    is damaged, from its newest checkpoint (each one keeps a copy)."""
    try:
        return rundir.read_record(output)["config"]
    except UsageError as damaged:
        for checkpoint in reversed(list_checkpoints(output)):
            try:
                saved, _ = load_checkpoint_state(checkpoint, tensors=False)
            except (OSError, ValueError, UsageError):
                continue
            if isinstance(saved.get("config"), dict):
                return saved["config"]
        raise damaged


def precompute(config: RunConfig, catalog: Catalog, reporter: Reporter | None = None
               ) -> dict[str, Any]:
    """``dpo precompute-ref``: score the pairs of ``config`` (training and held out) with the
    reference model a ``dpo run`` with the same options would use, into its file. A later run
    with the same reference, data and length settings reads them instead of scoring again."""
    reporter = reporter or Reporter(Path(config.output), enabled=True, progress=config.progress)
    backend = resolve_backend(config.backend, catalog)
    device = backend.device(0)
    dtype = resolve_dtype(config.dtype, backend)
    check_options(config, catalog)
    loss_cls = catalog.losses.get(config.loss, asked="loss" in config.model_fields_set)
    if not loss_cls.requires_reference:
        raise UsageError(f"loss {config.loss!r} uses no reference model: nothing to precompute")
    if config.ref_logps:
        check_ref_logps(config.ref_logps)
    if config.format:
        catalog.formats.get(config.format)
    spec = config.ref_model or config.model
    describe = resolve_source(spec).describe()
    model, tokenizer = load_model(config.model, config.seed)
    train_pairs, eval_pairs, _, _ = _tokenized(config, catalog, tokenizer, reporter)
    if config.ref_model:
        model, ref_tokenizer = load_model(config.ref_model, config.seed)
        check_same_tokenizer(tokenizer, ref_tokenizer, config.model, config.ref_model)
    disable_dropout(model)
    model.requires_grad_(False).to(device)
    backend.configure_model(model)
    batches = first_batches(train_pairs, eval_pairs, make_sampler(train_pairs, config, DistInfo()),
                            config, DistInfo())
    pairs = train_pairs + eval_pairs
    paths, _ = check_paths(model, resolve_paths(config, backend, model),
                           first_check_pairs(train_pairs, config, DistInfo()), backend, device,
                           tokenizer.pad_token_id, DistInfo(), reporter, "reference")
    started = time.perf_counter()
    table, path, computed = precompute_reference(model, batches, config, backend, device, dtype,
                                                 tokenizer.pad_token_id, DistInfo(), reporter,
                                                 describe, paths)
    return {"path": str(path), "pairs": len(pairs), "computed": computed,
            "pairs_in_file": len(table.values), "reference": describe, "dtype": table.dtype,
            "paths": paths.used(),
            "model_digest": table.model_digest,
            "seconds": round(time.perf_counter() - started, 3)}
