"""From a RunConfig and the plugin catalog to a finished run: ``dpo run`` (DPO and its
relatives) and ``dpo sft`` (supervised fine-tuning), one setup and one loop.

The setup is a ``Recipe`` of named stages that run top to bottom (``Recipe.train``):

1. ``resolve``: names and options (backend, dtype, loss, stopping policies), cheap checks first;
2. ``claim_output``: the output directory, and the checkpoint to resume from;
3. ``load``: the model, the data, the reference (DPO), the speed paths;
4. ``take_output``: the first write (``run.json``), once every rank has checked its input;
5. ``place_models``: models on the device, their speed paths checked on real data;
6. ``build_optimizer``: activation checkpointing, compilation, wrapping, AdamW, the schedule
   (and, for DPO, the reference log-probs computed before training);
7. ``restore``: a resumed run's optimizer, schedule, policies, RNG and data position;
8. ``describe``: the run's record, then the loop (``dpo.core.training.loop``), then ``finish``.

Everything that can be wrong with the input (names, options, data, output directory) is checked
before anything is written, so bad input leaves nothing half-written on disk.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dpo.core.data.batching import collate, collate_examples
from dpo.core.interfaces.errors import DpoError, Interrupted, UsageError
from dpo.core.interfaces.logger import Logger, RunInfo
from dpo.core.interfaces.loss import Loss
from dpo.core.interfaces.plugins import Catalog
from dpo.core.interfaces.stopping import RunContext, StoppingPolicy
from dpo.core.model.activations import checkpoint_layers
from dpo.core.model.dropout import disable_dropout
from dpo.core.model.flops import FlopCounter
from dpo.core.model import lora
from dpo.core.model.loading import (base_record, causal_lm, load_model, resolve_source,
                                     transformers_bars_off)
from dpo.core.model.paths import Paths
from dpo.core.training import refupdate, rundir
from dpo.core.training import strategy as strat
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
from dpo.core.training.combination import loss_label, options_record, resolve_loss
from dpo.core.training.config import RunConfig
from dpo.core.training.distributed import DistInfo
from dpo.core.training.layout import FINAL, MERGED, METRICS_FILE, RUN_FILE, SAMPLES_FILE
from dpo.core.training.loggers import resolve_loggers
from dpo.core.training.merging import merge_adapter
from dpo.core.training.loop import Outcome, Settings, Trainee, TrainState, train
from dpo.core.training.objectives import (DpoObjective, Objective, SftObjective,
                                          example_length, pair_length, sft_paths)
from dpo.core.training.plugin_calls import plugin_call
from dpo.core.training.report import Reporter, last_reported_step, truncate_metrics
from dpo.core.training.samples import (RunSamples, SampleSettings, no_held_out, sample_prompts,
                                       truncate_samples)
from dpo.core.training.schedule import build_scheduler, set_peak_lr
from dpo.core.training.unpaired import KtoObjective
from dpo.core.training.tasks import TaskRunner, TaskSuite, split_tasks
from dpo.core.training.setup import (
    check_compile,
    check_options,
    check_paths,
    check_ref_logps,
    check_resume_world,
    check_same_tokenizer,
    check_world,
    describe_reference,
    first_batches,
    first_check_pairs,
    holds_out,
    make_sampler,
    precompute_reference,
    resolve_backend,
    resolve_dtype,
    resolve_paths,
    tokenized_data,
    total_steps,
    versions,
)

# Options that only mean something for preference training: a run of another objective that
# sets them is refused rather than silently ignoring them.
PREFERENCE_ONLY = ("ref_model", "ref_logps", "share_prompt", "ref_update_steps")


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
        recipe = Recipe(config, catalog, dist, output, reporter, resume, overwrite, taken)
        outcome = recipe.train(on_save)
        reporter.end("stopped" if outcome.stopped_by else "completed")
        # Every rank is past its last collective before any rank tears the group down: a rank
        # that destroys it while another still has gloo work in flight can abort at exit.
        strat.barrier(dist)
        return outcome
    except KeyboardInterrupt:
        exc = Interrupted(taken.interrupted())
        taken.end(f"interrupted: {exc}")
        reporter.end("interrupted")
        raise exc from None
    except Interrupted as exc:
        taken.end(f"interrupted: {exc}")
        reporter.end("interrupted")
        raise
    except DpoError as exc:
        taken.end(f"failed: {exc}")
        reporter.end("failed")
        raise
    except BaseException as exc:
        taken.end(f"failed: {type(exc).__name__}: {exc}")
        reporter.end("failed")
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


class Recipe:
    """One run's setup as named stages, top to bottom (see the module docstring). Each stage
    sets the attributes the next ones read; nothing is written before ``take_output``."""

    def __init__(self, config: RunConfig, catalog: Catalog, dist: DistInfo, output: Path,
                 reporter: Reporter, resume: bool, overwrite: bool, taken: _Taken):
        self.config, self.catalog, self.dist, self.output = config, catalog, dist, output
        self.reporter, self.resume, self.overwrite, self.taken = reporter, resume, overwrite, taken
        self.sft = config.objective == "sft"
        self.noun = "examples" if self.sft else "pairs"
        self.length: Callable[[Any], int] = example_length if self.sft else pair_length
        self.loss: Loss | None = None
        self.policies: dict[str, StoppingPolicy] = {}
        self.checkpoint: Path | None = None
        self.previous: dict[str, Any] = {}
        self.reference: torch.nn.Module | None = None  # scores each batch (DPO, in memory)
        self.ref_source: torch.nn.Module | None = None  # scores every pair once, then goes
        self.ref_paths: Paths | None = None
        self.ref_table: Any = None
        self.ref_record: dict[str, Any] | None = None
        self.ref_path: Path | None = None
        self.ref_checked: Any = None
        self.lora: lora.LoraOptions | None = None
        self.loggers: list[Logger] = []
        self.logged_through = 0  # the last step earlier attempts reported (resumed runs)
        self.base_reference = False  # the reference is the policy with its adapter disabled
        self.unpaired = False  # the loss trains on unpaired examples (KTO)
        self.reference_update: refupdate.ReferenceUpdate | None = None  # TR-DPO

    def train(self, on_save: Callable[[Path], None] | None = None) -> Outcome:
        self.resolve()
        self.claim_output()
        self.load()
        self.take_output()
        self.place_models()
        self.build_optimizer()
        self.restore()
        self.describe()
        outcome = train(self.trainee(), self.settings(), self.state, self.reporter,
                        on_save=on_save)
        return self.finish(outcome)

    @property
    def requires_reference(self) -> bool:
        return self.loss is not None and self.loss.requires_reference

    # 1. Names and options: cheap checks first.
    def resolve(self) -> None:
        config, catalog, dist = self.config, self.catalog, self.dist
        self.backend = backend = resolve_backend(config.backend, catalog)
        check_world(backend, dist)
        # A LoRA run too: its base's frozen activations and PEFT's small per-layer tensors
        # leave freed blocks on the heap that a long-lived one pins, so that without this its
        # peak is near full fine-tuning's (benchmarks/lora_memory.py).
        saving = config.gradient_checkpointing or config.lora
        self.memory_note = backend.save_memory() if saving else None
        self.device = backend.device(dist.local_rank)
        # Joined first, so that no rank writes before every rank has checked the input.
        strat.init_process_group(dist, backend.collective, self.device)
        self.dtype = resolve_dtype(config.dtype, backend)
        check_options(config, catalog)
        # Named by a flag or config file now, or a default (a resumed run's recorded names
        # count as defaults): where two plugins register a name, only a named one is an error.
        named = set() if self.resume else config.model_fields_set
        if self.sft:
            given = [key for key in PREFERENCE_ONLY if getattr(config, key)]
            if given:
                raise UsageError(f"--{given[0].replace('_', '-')}: dpo sft trains no preference "
                                 "loss, so it takes no reference; drop it")
        else:
            self.loss = resolve_loss(config.loss, config.options, catalog,
                                     asked="loss" in named, origins=config.file_origins)
            self.resolve_unpaired()
        for name in config.stop:
            cls = catalog.stopping.get(name, asked="stop" in named)
            self.policies[name] = plugin_call(cls, "__init__", cls,
                                              cls.parse_options(config.plugin_options(name)))
        context = RunContext(objective=config.objective, holds_out=holds_out(config),
                             loss=None if self.loss is None else self.loss.name,
                             loss_options=({} if self.loss is None
                                           else self.loss.options.model_dump(mode="json")),
                             world_size=dist.world_size)
        for policy in self.policies.values():
            plugin_call(policy, "prepare()", policy.prepare, context)
        if config.format:
            catalog.formats.get(config.format)
        self.loggers = resolve_loggers(config.log_to, catalog, config.plugin_options,
                                       asked="log_to" in named)
        watches = {name: plugin_call(p, "watches()", p.watches)
                   for name, p in self.policies.items()}
        watched = [m for metrics in watches.values() for m in metrics if m.startswith("eval/")]
        for name, metrics in watches.items():
            unknown = [m for m in metrics if m.startswith("eval/")
                       and self.sft and m not in SftObjective.EVAL_METRICS]
            if unknown:
                raise UsageError(f"--stop {name} watches {unknown[0]}, which dpo sft does not "
                                 f"report (its evaluations: {', '.join(SftObjective.EVAL_METRICS)}"
                                 f"); set -o {name}.metric=eval/loss (with mode=min)")
        if watched and not holds_out(config):
            raise UsageError(f"stopping on {watched[0]} needs held-out {self.noun}: give "
                             "--eval-data or --eval-fraction")
        if config.ref_model and not self.requires_reference:
            raise UsageError(f"--ref-model given, but loss {config.loss!r} uses no reference "
                             "model")
        if config.ref_logps and not self.sft and not self.requires_reference:
            raise UsageError(f"--ref-logps given, but loss {config.loss!r} uses no reference "
                             "log-probs; drop it")
        if config.ref_update_steps:
            refupdate.check(self.requires_reference, config.loss)
        if config.sample_prompts and not holds_out(config):
            raise no_held_out(config.sample_prompts)
        if config.compile:
            check_compile(self.device)
        if config.lora:
            self.lora = lora.parse_options(config.plugin_options(lora.OPTIONS_KEY))
            lora.require_peft()
        self.tasks = None
        if config.eval_tasks:
            if dist.world_size > 1:
                raise UsageError("--eval-tasks: benchmarks are scored in one process; drop "
                                 "--nproc, or score the run's models afterwards with `dpo eval "
                                 "--tasks`")
            self.tasks = TaskRunner(TaskSuite(split_tasks(config.eval_tasks), "--eval-tasks"),
                                    self.output, steps=config.eval_tasks_steps,
                                    limit=config.eval_tasks_limit, batch_size=config.batch_size,
                                    write=dist.is_main)
        self.sources = {"model": resolve_source(config.model).describe()}
        if config.ref_model:
            self.sources["ref_model"] = resolve_source(config.ref_model).describe()
        if config.ref_logps and self.requires_reference and config.precompute_ref:
            check_ref_logps(config.ref_logps)

    def resolve_unpaired(self) -> None:
        """A loss over unpaired examples (``Loss.examples == "unpaired"``, KTO): its data,
        its objective and its reference, a model in memory (precomputed reference log-probs
        are stored per pair)."""
        config = self.config
        self.unpaired = getattr(self.loss, "examples", "pairs") == "unpaired"
        if not self.unpaired:
            return
        from dpo.core.data.unpaired import unpaired_length

        self.noun, self.length = "examples", unpaired_length
        if config.ref_logps:
            raise UsageError(f"--ref-logps: loss {config.loss!r} trains on unpaired examples, "
                             "whose reference log-probs are scored in each step, not read from a "
                             "file; drop --ref-logps")
        if config.batch_size < 2:
            raise UsageError(f"--batch-size {config.batch_size}: loss {config.loss!r} estimates "
                             "its KL term from the other examples of a micro-batch; use "
                             "--batch-size 2 or more")
        if self.requires_reference and config.precompute_ref and "precompute_ref" in (
                config.model_fields_set):
            self.reporter.info(f"loss {config.loss!r}: the reference scores each batch in "
                               "memory; precomputed reference log-probs are per pair, so "
                               "--precompute-ref does not apply to unpaired examples")

    # 2. The output directory and the checkpoint to resume from.
    def claim_output(self) -> None:
        config, output, reporter = self.config, self.output, self.reporter
        rundir.check_output(config.output, "--resume" if self.resume else "--output")
        if not self.resume:
            if output.exists() and any(output.iterdir()):
                if not self.overwrite:
                    raise UsageError(f"{output}: already holds files; resume with --resume "
                                     f"{output}, or pass --overwrite to start over there")
                if not rundir.is_run_dir(output):
                    raise UsageError(f"{output}: not a dpo run directory (no {RUN_FILE}), so "
                                     "--overwrite leaves it alone; choose another --output")
            return
        if not rundir.is_run_dir(output) and latest_checkpoint(output) is None:
            raise UsageError(f"{output}: not a dpo run directory (no {RUN_FILE}); start a run "
                             f"there with --output {output}")
        with contextlib.suppress(UsageError):  # a damaged run.json is rewritten below
            self.previous = rundir.read_record(output)
        self.logged_through = last_reported_step(output / METRICS_FILE)
        previous = self.previous
        if rundir.nothing_to_resume(previous, output, config.model_dump()):
            raise UsageError(f"{output}: the run is already complete ({previous['status']}); "
                             f"its model is {output / 'final'}{rundir.reopen_hint(previous)}")
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
            return
        for path, reason in damaged:
            reporter.warn(f"{path.name} is damaged ({reason}); resuming from {checkpoint.name}")
        if not has_manifest(checkpoint):
            reporter.info(f"{checkpoint.name} has no manifest (written by an earlier version): "
                          "its files load, but their contents cannot be verified")
        check_resume_world(checkpoint, self.dist, config.strategy)
        if self.requires_reference:
            refupdate.check_resume(checkpoint, config.precompute_ref)
        self.checkpoint = checkpoint

    # 3. Model, data and reference (always re-loaded from --model, never from a checkpoint).
    def load(self) -> None:
        config, dist = self.config, self.dist
        torch.manual_seed(config.seed)
        trust = config.trust_remote_code
        model, self.tokenizer = load_model(config.model, config.seed, trust_remote_code=trust)
        if self.lora is not None:
            lora.add_adapter(model, self.lora, base_record(config.model, config.seed, trust))
        if self.requires_reference and config.ref_model:  # its checks before the data's log
            self.reference, ref_tokenizer = load_model(config.ref_model, config.seed,
                                                       trust_remote_code=trust)
            check_same_tokenizer(self.tokenizer, ref_tokenizer, config.model, config.ref_model)
            if config.ref_update_steps:
                refupdate.same_architecture(model, self.reference, config.model, config.ref_model)
            self.reference.requires_grad_(False).eval()
        self.train_examples, self.eval_examples, self.stats, self.eval_stats = tokenized_data(
            config, self.catalog, self.tokenizer, self.reporter, self.unpaired)
        if config.sample_prompts and not self.eval_examples:
            raise no_held_out(config.sample_prompts)
        if not self.requires_reference or config.ref_model or self.precompute_ref:
            pass  # no reference, the --ref-model loaded above, or log-probs computed once
        elif self.lora is not None:
            self.base_reference = True  # no copy: the policy with its adapter disabled
        else:
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
        # With precomputed reference log-probs, the reference scores every pair once and is
        # then dropped; without --ref-model it is the policy itself before any update (on
        # resume, the weights loaded from --model here, before the checkpoint's replace them).
        if self.requires_reference and self.precompute_ref:
            self.ref_source = self.reference if self.reference is not None else model
            self.reference = None
        if self.checkpoint is not None:
            model = self.resumed_weights(model)
        if dist.world_size > 1 and config.strategy == "fsdp":
            strat.decoder_layers(model)  # a model FSDP cannot shard is refused before any write
        self.model = model
        self.paths = resolve_paths(config, self.backend, model, dist)
        if self.sft or self.unpaired:
            self.paths = sft_paths(self.paths)
        if (config.gradient_checkpointing and not self.paths.layer_checkpointing
                and not getattr(model, "supports_gradient_checkpointing", False)):
            raise UsageError(f"--gradient-checkpointing: {type(model).__name__} supports no "
                             "activation checkpointing (transformers' own or ours: "
                             f"{self.paths.reasons().get('layer_checkpointing')}); run without it")
        if self.reference is not None and config.ref_model:
            self.ref_paths = resolve_paths(config, self.backend, self.reference, dist)
        elif self.ref_source is not None and self.ref_source is not model:
            self.ref_paths = resolve_paths(config, self.backend, self.ref_source, dist)
        if self.unpaired and self.ref_paths is not None:
            self.ref_paths = sft_paths(self.ref_paths)

    @property
    def precompute_ref(self) -> bool:
        """Whether the reference scores every pair once, before training (never for unpaired
        examples: see ``resolve_unpaired``)."""
        return self.config.precompute_ref and not self.unpaired

    def resumed_weights(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model with the checkpoint's weights: its adapter (LoRA; the base stays the one
        loaded from --model, which is also the reference), or the whole model."""
        has_adapter = (self.checkpoint / lora.ADAPTER_WEIGHTS).is_file()
        if has_adapter != (self.lora is not None):
            held = "a LoRA adapter" if has_adapter else "a full model"
            raise UsageError(f"{self.checkpoint} holds {held}: resume it "
                             f"{'with' if has_adapter else 'without'} --lora")
        if self.lora is None:
            with transformers_bars_off():
                return causal_lm(self.checkpoint,
                                 trust_remote_code=self.config.trust_remote_code)
        from safetensors.torch import load_file

        lora.load_weights(model, load_file(str(self.checkpoint / lora.ADAPTER_WEIGHTS)))
        return model

    # 4. The first write: once every rank has checked its input.
    def take_output(self) -> None:
        dist, output = self.dist, self.output
        strat.barrier(dist)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if dist.is_main:
            if self.checkpoint is None and output.is_dir() and rundir.is_run_dir(output):
                removed = rundir.clear_run(output)  # --overwrite, or a resume from nothing
                if removed:
                    self.reporter.info(f"starting over in {output}: removed what the run there "
                                       f"wrote ({', '.join(p.name for p in removed)})")
            output.mkdir(parents=True, exist_ok=True)
        strat.barrier(dist)
        # The directory is this run's from here on: run.json marks it, whatever happens next.
        self.started, self.resumes = now, []
        if self.checkpoint is not None:
            self.started = self.previous.get("started", now)
            self.resumes = [*self.previous.get("resumes", []),
                            {"at": now, "from": self.checkpoint.name}]
        self.taken.write({"status": "running", "config": self.config.model_dump(),
                          "started": self.started, "resumes": self.resumes,
                          "resumed_from": str(self.checkpoint) if self.checkpoint else None})

    # 5. Models on the device; their speed paths checked on the run's first examples.
    def place_models(self) -> None:
        config, dist, backend, device = self.config, self.dist, self.backend, self.device
        for m in (self.model, self.reference, self.ref_source):
            if m is not None:
                disable_dropout(m)
                lora.set_dropout(m)
                m.to(device)
                backend.configure_model(m)  # before the optimizer sees the parameters
        self.sampler = make_sampler(self.train_examples, config, dist, self.length)
        check = first_check_pairs(self.train_examples, config, dist, self.length)
        pad, rows = self.tokenizer.pad_token_id, collate_examples if self.sft else collate
        if self.unpaired:
            rows = _unpaired_rows
        self.paths, self.checked = check_paths(self.model, self.paths, check, backend, device,
                                               pad, dist, self.reporter, "policy", rows)
        if self.ref_paths is not None:
            scorer = self.reference if self.reference is not None else self.ref_source
            self.ref_paths, self.ref_checked = check_paths(scorer, self.ref_paths, check, backend,
                                                           device, pad, dist, self.reporter,
                                                           "reference", rows)
        # A reference that is the policy itself, in one process, scores after the backend's
        # last pass over the policy (e.g. ipex.optimize, in build_optimizer), so that step 1
        # runs the very same kernels; a separate reference (or one about to be sharded)
        # scores now and is dropped.
        self.score_later = self.ref_source is self.model and dist.world_size == 1
        if self.ref_source is not None and not self.score_later:
            self.score_reference(self.ref_source)
            self.ref_source = None  # its weights go now (a separate copy only on resume)
            gc.collect()

    def score_reference(self, scorer: torch.nn.Module) -> None:
        """DPO's reference log-probs of every pair, computed once (or read from their file)."""
        started = time.perf_counter()
        batches = first_batches(self.train_examples, self.eval_examples, self.sampler,
                                self.config, self.dist)
        with lora.adapter_disabled(scorer):  # a LoRA policy's reference: its base
            self.ref_table, self.ref_path, computed = precompute_reference(
                scorer, batches, self.config, self.backend, self.device, self.dtype,
                self.tokenizer.pad_token_id, self.dist, self.reporter,
                describe=self.sources.get("ref_model", self.sources["model"]),
                paths=self.paths if self.ref_paths is None else self.ref_paths)
        self.ref_record = {"file": str(self.ref_path), "pairs_scored": computed,
                           "seconds": round(time.perf_counter() - started, 3)}

    # 6. Activation checkpointing, compilation, wrapping, the optimizer and its schedule.
    def build_optimizer(self) -> None:
        config, dist, backend, model = self.config, self.dist, self.backend, self.model
        if config.gradient_checkpointing and self.paths.layer_checkpointing:
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
            self.reference = strat.wrap_reference(
                self.reference, config.strategy, dist,
                self.paths if self.ref_paths is None else self.ref_paths)
            trained = strat.wrap_policy(model, config.strategy, dist, self.device, self.paths)
        else:
            trained = model
        if config.ref_update_steps:
            self.reference_update = refupdate.ReferenceUpdate(
                self.reference, config.ref_update_steps, config.ref_update_alpha)
        trained_params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapter
        decay = [p for p in trained_params if p.ndim >= 2]
        no_decay = [p for p in trained_params if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
                                      **backend.optimizer_options())
        if dist.world_size > 1:
            trained, optimizer = backend.prepare(trained, optimizer, self.dtype)
        else:
            model, optimizer = backend.prepare(model, optimizer, self.dtype)
            trained = self.model = model
        self.trained, self.optimizer = trained, optimizer
        if self.score_later and self.ref_source is not None:
            self.ref_source = None
            self.score_reference(model)
        self.steps = total_steps(config, len(self.sampler))
        self.warmup = config.warmup_steps or round(config.warmup_ratio * self.steps)
        self.scheduler = build_scheduler(optimizer, config.scheduler, self.warmup, self.steps)

    # 7. A resumed run: where it was, exactly.
    def restore(self) -> None:
        config, reporter, optimizer = self.config, self.reporter, self.optimizer
        self.state = TrainState()
        if self.checkpoint is None:
            return
        saved, tensors = load_checkpoint_state(self.checkpoint)
        self.state = state = TrainState(**saved["train"])
        strat.load_optimizer_state(self.trained, optimizer, tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        if set_peak_lr(self.scheduler, config.lr):
            reporter.info(f"peak learning rate now {config.lr:g} (--lr), from step {state.step}")
        decay = optimizer.param_groups[0]  # the matrices' group; biases and norms take none
        if decay["weight_decay"] != config.weight_decay:
            decay["weight_decay"] = config.weight_decay
            reporter.info(f"weight decay now {config.weight_decay:g} (--weight-decay), from "
                          f"step {state.step}")
        for name, policy in self.policies.items():
            plugin_call(policy, "load_state_dict()", policy.load_state_dict,
                        saved["policies"].get(name, {}))
        if self.loss is not None:  # a loss with state (checkpoints before it had none)
            plugin_call(self.loss, "load_state_dict()", self.loss.load_state_dict,
                        saved.get("loss", {}))
        self.backend.set_rng_state(restore_rng_states(tensors["rng"]))
        updated = self.checkpoint / refupdate.REFERENCE_WEIGHTS
        if self.reference is not None and updated.is_file():  # TR-DPO's, at that step
            refupdate.load_reference(self.reference, updated)
            reporter.info(f"reference weights (TR-DPO) restored from {updated}")
        elif self.reference_update is not None:
            reporter.info(f"{self.checkpoint.name} holds no updated reference (its run did not "
                          "update one): the reference is the one loaded")
        if self.dist.is_main:
            truncate_metrics(self.output / METRICS_FILE, state.step)
            truncate_samples(self.output / SAMPLES_FILE, state.step)
        reporter.info(f"resuming from {self.checkpoint} (step {state.step})")

    # 8. The run's record, the loop's inputs, and what a finished run leaves.
    def describe(self) -> None:
        config, dist, backend = self.config, self.dist, self.backend
        options = {n: p.options.model_dump(mode="json") for n, p in self.policies.items()}
        if self.loss is not None:
            options = {**options_record(self.loss), **options}
        reference = ("none (supervised fine-tuning)" if self.sft else
                     describe_reference(config, self.requires_reference, self.ref_path))
        update = None
        if self.reference_update is not None:
            start = (f"--ref-model {config.ref_model}" if config.ref_model
                     else "a copy of --model")
            reference = refupdate.describe(config.ref_update_steps, config.ref_update_alpha,
                                           start)
            update = {"every_steps": config.ref_update_steps, "alpha": config.ref_update_alpha,
                      "method": "TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656)"}
        adapter = lora.describe(self.model) if self.lora is not None else None
        self.record = {
            "status": "running",
            "config": config.model_dump(),
            "resolved": {"backend": backend.name, "device": backend.describe(),
                         "dtype": str(self.dtype), "objective": config.objective,
                         "total_steps": self.steps, "warmup_steps": self.warmup,
                         "world_size": dist.world_size,
                         "strategy": config.strategy if dist.world_size > 1 else None,
                         "options": options, "models": self.sources, "reference": reference,
                         "reference_update": update,
                         "reference_logps": self.ref_record,
                         "share_prompt": self.paths.shared_prompt,
                         "packed_rows": self.paths.packed_rows,
                         "paths": {**self.paths.record(), "check": self.checked.record()},
                         "reference_paths": (None if self.ref_paths is None else
                                             {**self.ref_paths.record(),
                                              "check": self.ref_checked.record()}),
                         "memory": self.memory_note, "lora": adapter},
            "data": {"train": self.stats.as_dict(),
                     "eval": self.eval_stats.as_dict() if self.eval_stats else None},
            "versions": {**versions(),
                         **({"peft": lora.require_peft().__version__} if self.lora else {})},
            "started": self.started,
            "resumes": self.resumes,
            "resumed_from": str(self.checkpoint) if self.checkpoint else None,
        }
        self.taken.write(self.record)
        what = "sft" if self.sft else f"loss {loss_label(self.loss)}"
        if not self.sft and not self.requires_reference:
            what += " (reference-free: no reference model, no reference log-probs)"
        self.reporter.info(f"training {config.model} on {backend.describe()} ({self.dtype}), "
                           f"{what}, {self.steps} steps, "
                           f"{sum(p.numel() for p in self.model.parameters()):,} parameters")
        if adapter is not None:
            share = adapter["trainable_parameters"] / adapter["base_parameters"]
            self.reporter.info(
                f"LoRA r={adapter['r']} alpha={adapter['alpha']:g} on {adapter['modules']} "
                f"layers ({', '.join(adapter['targets'])}): {adapter['trainable_parameters']:,} "
                f"trainable parameters ({share:.2%} of the base); the reference is the base "
                "model (the adapter disabled)")
        if update is not None:
            self.reporter.info(f"TR-DPO: the reference is updated from the policy every "
                               f"{update['every_steps']} steps (alpha {update['alpha']:g}); it "
                               "stays in memory, its log-probs are not precomputed")
        if self.memory_note:
            self.reporter.info(f"memory: {self.memory_note}")
        self.reporter.attach(self.loggers, RunInfo(
            output=self.output, config=config.model_dump(mode="json"), step=self.state.step,
            resumed=self.resume, logged_through=self.logged_through))

    def objective(self) -> Objective:
        pad = self.tokenizer.pad_token_id
        if self.sft:
            return SftObjective(self.backend, self.dtype, pad, self.paths)
        if self.unpaired:
            return KtoObjective(self.backend, self.dtype, pad, self.loss, self.paths,
                                self.reference, self.ref_paths, self.base_reference)
        # Measured on the vs-TRL batches: group by group lowers the peak without checkpointing
        # (4.23 -> 4.09 GiB) but raises it with it (2.98 -> 3.34 GiB: the checkpoints are
        # small, and interleaving the groups' passes spreads the heap), so only without.
        by_group = self.paths.shared_prompt and not self.config.gradient_checkpointing
        return DpoObjective(self.backend, self.dtype, pad, self.loss, self.paths, self.reference,
                            self.ref_paths, self.ref_table, backward_by_group=by_group,
                            base_reference=self.base_reference)

    def trainee(self) -> Trainee:
        return Trainee(policy=self.trained, tokenizer=self.tokenizer, backend=self.backend,
                       device=self.device, objective=self.objective(), policies=self.policies,
                       optimizer=self.optimizer, scheduler=self.scheduler,
                       train_examples=self.train_examples, eval_examples=self.eval_examples,
                       sampler=self.sampler, output=self.output, dist=self.dist,
                       strategy=self.config.strategy, flops=FlopCounter.of(self.model),
                       trust_remote_code=self.config.trust_remote_code,
                       samples=self.samples(), tasks=self.tasks,
                       reference_update=self.reference_update)

    def samples(self) -> RunSamples | None:
        """``--sample-prompts``: the first N held-out prompts' completions at each evaluation."""
        config = self.config
        if not config.sample_prompts:
            return None
        prompts = sample_prompts(self.eval_examples, self.tokenizer, config.sample_prompts)
        if len(prompts) < config.sample_prompts:
            self.reporter.info(f"--sample-prompts {config.sample_prompts}: the run holds out "
                               f"{len(prompts)} {self.noun}; sampling all of them")
        settings = SampleSettings(len(prompts), config.sample_max_new_tokens,
                                  config.sample_temperature, config.seed)
        width = self.backend.padded_length if self.backend.static_shapes else None
        return RunSamples(prompts, settings, self.output, self.tokenizer, self.device,
                          self.dist, config.strategy, width)

    def settings(self) -> Settings:
        config = self.config
        return Settings(total_steps=self.steps, grad_accum=config.grad_accum,
                        max_grad_norm=config.max_grad_norm, eval_steps=config.eval_steps,
                        save_steps=config.save_steps, save_total_limit=config.save_total_limit,
                        dtype=self.dtype, batch_size=config.batch_size,
                        eval_at_start=config.eval_at_start, config=config.model_dump(mode="json"))

    def finish(self, outcome: Outcome) -> Outcome:
        output, reporter, record = self.output, self.reporter, self.record
        status = (f"{'paused' if outcome.paused else 'stopped'} by {outcome.stopped_by}: "
                  f"{outcome.reason}" if outcome.stopped_by else "completed")
        record.update({"status": status, "steps": outcome.step, "final": outcome.train_metrics,
                       "final_eval": outcome.eval_metrics,
                       "initial_eval": outcome.initial_eval or None,
                       "restored_best_from_step": outcome.restored_step,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        self.taken.write(record)
        if outcome.saved and not outcome.paused and self.dist.is_main:
            if self.config.keep_checkpoints:
                kept = list_checkpoints(output)[-1:]
                if kept:
                    size = sum(f.stat().st_size for f in kept[0].rglob("*") if f.is_file())
                    reporter.info(f"kept {kept[0].name} ({size / 2**30:.2f} GiB) to extend the "
                                  f"run with --resume {output} --max-steps N; "
                                  "--no-keep-checkpoints removes checkpoints once a run is "
                                  "complete")
            else:
                removed = remove_checkpoints(output, reporter.warn)
                if removed:
                    reporter.info(f"removed {', '.join(p.name for p in removed)}: the run is "
                                  f"complete and its model is in {output / 'final'}")
        if self.config.merge and outcome.saved and not outcome.paused and self.dist.is_main:
            self.write_merged(record)
        if outcome.paused:
            reporter.warn(f"paused by {outcome.stopped_by} at step {outcome.step}: "
                          f"{outcome.reason}; continue with --resume {output}")
        elif outcome.stopped_by:
            reporter.warn(f"stopped by {outcome.stopped_by} at step {outcome.step}: "
                          f"{outcome.reason}")
        final_label = (f"eval (best, step {outcome.restored_step})"
                       if outcome.restored_step is not None else f"eval (step {outcome.step})")
        reporter.summary(f"{status} after {outcome.step} steps -> {output}",
                         outcome.train_metrics, outcome.eval_metrics,
                         before=outcome.initial_eval, eval_label=final_label)
        return outcome


    def write_merged(self, record: dict[str, Any]) -> None:
        """``--merge``: final/'s adapter merged into the base model, in ``merged/``. The
        trained model goes first (the merge loads the base again)."""
        self.model = self.trained = self.optimizer = self.scheduler = None
        gc.collect()
        merged = merge_adapter(self.output / FINAL, self.output / MERGED,
                               trust_remote_code=self.config.trust_remote_code)
        record["merged"] = str(merged)
        self.taken.write(record)
        self.reporter.info(f"merged the adapter into the base model: {merged} (a plain "
                           "transformers model)")


def _unpaired_rows(examples: list[Any], pad_token_id: int, **kwargs: Any) -> Any:
    """The rows the speed-path check scores for unpaired examples: the examples themselves."""
    return collate_examples([e.example for e in examples], pad_token_id, **kwargs)


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
    loss = resolve_loss(config.loss, config.options, catalog,
                        asked="loss" in config.model_fields_set, origins=config.file_origins)
    if getattr(loss, "examples", "pairs") == "unpaired":
        raise UsageError(f"loss {config.loss!r} trains on unpaired examples, whose reference "
                         "log-probs are scored during the run: nothing to precompute")
    if not loss.requires_reference:
        raise UsageError(f"loss {config.loss!r} uses no reference model: nothing to precompute")
    if config.ref_logps:
        check_ref_logps(config.ref_logps)
    if config.format:
        catalog.formats.get(config.format)
    spec = config.ref_model or config.model
    describe = resolve_source(spec).describe()
    trust = config.trust_remote_code
    model, tokenizer = load_model(config.model, config.seed, trust_remote_code=trust)
    train_pairs, eval_pairs, _, _ = tokenized_data(config, catalog, tokenizer, reporter)
    if config.ref_model:
        model, ref_tokenizer = load_model(config.ref_model, config.seed, trust_remote_code=trust)
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
