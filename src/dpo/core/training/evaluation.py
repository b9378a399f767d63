"""``dpo eval``: preference metrics of a policy against its reference on held-out pairs, or,
for an SFT model, its loss on held-out demonstrations; and, with ``--tasks``, downstream
benchmarks through the lm-eval harness (``dpo.core.training.tasks``).

The metrics are those a run logs under ``eval/`` (TRL's names): the loss, ``rewards/accuracies``
(the share of pairs whose implicit reward prefers the chosen completion), ``rewards/margins``,
the chosen and rejected rewards, and the policy's summed completion log-probs; for SFT
(``--objective sft``, the default for a ``dpo sft`` run's model), the token-mean loss of the
completions and its perplexity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo.core.data.batching import collate, collate_examples
from dpo.core.data.stats import DataStats
from dpo.core.interfaces.errors import UsageError
from dpo.core.model import lora
from dpo.core.model.dropout import disable_dropout
from dpo.core.training.checkpoint import latest_checkpoint, load_checkpoint_state
from dpo.core.training.combination import loss_names, options_record, resolve_loss
from dpo.core.training.config import split_options
from dpo.core.training.layout import BEST, BEST_RECORD, FINAL, PREFIX
from dpo.core.training.loop import objective_metrics
from dpo.core.training.objectives import DpoObjective, Objective, SftObjective, sft_paths
from dpo.core.training.plugin_calls import plugin_call
from dpo.core.training.setup import (check_same_tokenizer, examples_of, resolve_backend,
                                     resolve_dtype)
from dpo.core.model.loading import load_model, resolve_source
from dpo.core.model.pathcheck import CHECK_PAIRS, check
from dpo.core.model.paths import resolve
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.rundir import RUN_FILE, read_record
from dpo.core.training.unpaired import KtoObjective
from dpo.core.training.tasks import (TaskSuite, harness_lm, results_document, results_file_of,
                                     write_results)


@dataclass
class EvalRequest:
    model: str
    data: str
    ref: str | None = None
    loss: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # loss options (beta, ...)
    format: str | None = None
    backend: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    max_length: int | None = None
    max_prompt_length: int | None = None
    strict: bool = False
    seed: int = 42
    objective: str | None = None  # dpo or sft; default: the run's, else dpo
    # Run the modelling code the models ship: asked for each evaluation, never taken from the
    # run's record (a run directory may come from anywhere).
    trust_remote_code: bool = False


def find_run_config(model: str) -> dict[str, Any] | None:
    """The configuration of the run that wrote ``model`` (a run directory, or its ``final/`` /
    ``checkpoint-N/`` / ``best/`` subdirectory), if there is one."""
    path = Path(model)
    for candidate in (path / RUN_FILE, path.parent / RUN_FILE):
        if candidate.is_file():
            return read_record(candidate.parent)["config"]
    return None


def loss_state_of(model: str) -> tuple[dict[str, Any], str | None]:
    """The state a loss with state (BCO's running mean) had where ``model`` was written, and
    where it comes from: a checkpoint's own; ``best/``'s, kept with its weights; for a run
    directory or its ``final/``, that of the weights ``final/`` holds: ``best/``'s where a
    stopping policy restored the best weights at the end, else the newest checkpoint's if it is
    of the run's last step. Else none: such a loss then evaluates from its initial state."""
    path = Path(model)
    checkpoint: Path | None = path
    try:
        if path.name == BEST and (path / BEST_RECORD).is_file():
            return _best_state(path)
        if not (path / "trainer_state.json").is_file():
            run_dir = path if (path / RUN_FILE).is_file() else path.parent
            if not (run_dir / RUN_FILE).is_file() or path not in (run_dir, run_dir / FINAL):
                return {}, None
            record = read_record(run_dir)
            restored = record.get("restored_best_from_step")
            if restored is not None:  # final/ holds best/'s weights: its state goes with them
                best = run_dir / BEST
                kept = json.loads((best / BEST_RECORD).read_text()) if (
                    best / BEST_RECORD).is_file() else {}
                return _best_state(best) if kept.get("step") == restored else ({}, None)
            checkpoint = latest_checkpoint(run_dir)
            if checkpoint is None or checkpoint.name != f"{PREFIX}{record.get('steps')}":
                return {}, None
        saved, _ = load_checkpoint_state(checkpoint, tensors=False)
    except (UsageError, OSError, ValueError):  # damaged: no state rather than no evaluation
        return {}, None
    state = saved.get("loss") or {}
    return state, str(checkpoint) if state else None


def _best_state(best: Path) -> tuple[dict[str, Any], str | None]:
    """The loss's state kept with the weights in ``best/`` (none in a run from before it was
    kept), and where it comes from."""
    state = json.loads((best / BEST_RECORD).read_text()).get("loss") or {}
    return state, str(best) if state else None


def model_dir(model: str) -> str:
    """A run directory stands for its final model (a full one, or a LoRA adapter)."""
    path = Path(model)
    final = path / "final"
    if (path / RUN_FILE).is_file() and ((final / "config.json").is_file()
                                        or lora.is_adapter_dir(final)):
        return str(final)
    return model


def evaluate_request(request: EvalRequest, catalog: Catalog) -> dict[str, Any]:
    """Resolve the request (defaults come from the run that wrote the model, when found) and
    compute the metrics. Returns the metrics and what was compared."""

    run = find_run_config(request.model) or {}
    objective = request.objective or run.get("objective", "dpo")
    if objective == "sft":
        return evaluate_demonstrations(request, run, catalog)
    loss_name = request.loss or run.get("loss", "dpo")
    # The run's options of its loss (of each part and the weights, for a combination).
    options = {plugin: dict(values) for plugin, values in run.get("options", {}).items()
               if plugin == loss_name or plugin in loss_names(loss_name)} if not request.loss else {}
    for plugin, values in split_options(request.options, loss_name).items():
        if plugin != loss_name and plugin not in loss_names(loss_name):
            raise UsageError(f"-o {plugin}.{next(iter(values))}=...: {plugin!r} is not the "
                             f"loss ({loss_name}) nor one of its parts")
        options.setdefault(plugin, {}).update(values)
    loss = resolve_loss(loss_name, options, catalog, asked=bool(request.loss))
    state, state_from = ({}, None) if request.loss else loss_state_of(request.model)
    if state:  # e.g. BCO's running mean, as the run left it
        plugin_call(loss, "load_state_dict()", loss.load_state_dict, state)
    if request.ref and not loss.requires_reference:
        raise UsageError(f"--ref given, but loss {loss.name!r} uses no reference model; drop it")
    ref = request.ref or run.get("ref_model") or run.get("model")
    if loss.requires_reference and not ref:
        raise UsageError(f"loss {loss.name!r} compares against a reference: give --ref (the "
                         "model training started from)")
    backend = resolve_backend(request.backend, catalog)
    dtype = resolve_dtype(request.dtype, backend)
    seed = run.get("seed", request.seed)  # `tiny` is built from the run's seed
    policy_spec = model_dir(request.model)
    resolve_source(policy_spec)
    if loss.requires_reference:
        resolve_source(ref)

    trust = request.trust_remote_code
    policy, tokenizer = load_model(policy_spec, seed, trust_remote_code=trust)
    unpaired = getattr(loss, "examples", "pairs") == "unpaired"  # KTO: unpaired examples
    pairs, stats = held_out(request, run, catalog, tokenizer, "dpo", unpaired)
    reference = None
    if loss.requires_reference:
        reference, ref_tokenizer = load_model(ref, seed, trust_remote_code=trust)
        check_same_tokenizer(tokenizer, ref_tokenizer, policy_spec, ref, flag="--ref")
    device = backend.device(0)
    for m in (policy, reference):
        if m is not None:
            disable_dropout(m)
            m.requires_grad_(False).eval().to(device)
    # The same speed paths and check as a run's, for each model.
    if unpaired:
        check_batch = collate_examples([e.example for e in pairs[:CHECK_PAIRS]],
                                       tokenizer.pad_token_id,
                                       pad_length=backend.padded_length).to(device)
    else:
        check_batch = collate(pairs[:CHECK_PAIRS], tokenizer.pad_token_id,
                              pad_length=backend.padded_length).to(device)
    found, checks = {}, {}
    for label, model in (("policy", policy), ("reference", reference)):
        if model is not None:
            paths = resolve(model, static_shapes=backend.static_shapes,
                            share_prompt_default=backend.share_prompt_default,
                            backend_name=backend.name)
            if unpaired:
                paths = sft_paths(paths)
            found[label], report = check(model, check_batch, paths, training=False)
            checks[label] = report.record()
    if unpaired:
        objective: Objective = KtoObjective(backend, dtype, tokenizer.pad_token_id, loss,
                                            found["policy"], reference, found.get("reference"))
    else:
        objective = DpoObjective(backend, dtype, tokenizer.pad_token_id, loss, found["policy"],
                                 reference, found.get("reference"))
    metrics = objective_metrics(objective, policy, pairs, request.batch_size, device)
    return {
        "objective": "dpo",
        "model": policy_spec,
        "ref": ref if loss.requires_reference else None,
        "loss": loss.name,
        "options": (loss.options.model_dump(mode="json") if len(loss_names(loss.name)) == 1
                    else options_record(loss)),
        "loss_state_from": state_from,
        "data": request.data,
        ("examples" if unpaired else "pairs"): len(pairs),
        "data_stats": stats.as_dict(),
        "backend": backend.name,
        "dtype": str(dtype).removeprefix("torch."),
        "paths": {label: paths.used() for label, paths in found.items()},
        "paths_check": checks,
        "metrics": {k.removeprefix("eval/"): v for k, v in metrics.items()},
    }


def held_out(request: EvalRequest, run: dict[str, Any], catalog: Catalog, tokenizer: Any,
             objective: str, unpaired: bool = False) -> tuple[list[Any], DataStats]:
    """The request's data, read and tokenised for ``objective`` (pairs, demonstrations, or
    unpaired examples for an unpaired loss), with the run's length limits unless the request
    sets its own."""
    noun, read, tokenize = examples_of(objective, unpaired)
    max_length = request.max_length or run.get("max_length", 512)
    max_prompt_length = request.max_prompt_length or run.get("max_prompt_length", 256)
    stats = DataStats()
    options = dict(run.get("options", {}).get(request.format, {})) if request.format else None
    records = read(request.data, catalog.formats, request.format, options,
                   strict=request.strict, stats=stats)
    examples, stats = tokenize(tokenizer, records, max_length, max_prompt_length,
                               strict=request.strict, stats=stats)
    if not examples:
        raise UsageError(f"{request.data}: no usable {noun} ({stats.as_dict()}); --strict "
                         "names the first unusable record with its line")
    return examples, stats


def evaluate_demonstrations(request: EvalRequest, run: dict[str, Any],
                            catalog: Catalog) -> dict[str, Any]:
    """An SFT model's token-mean loss and perplexity on held-out demonstrations (or pairs'
    chosen sides), on the speed paths a run would take, checked as a run checks them."""
    given = [flag for flag, value in (("--ref", request.ref), ("--loss", request.loss),
                                      ("-o", request.options)) if value]
    if given:
        raise UsageError(f"{given[0]}: an SFT evaluation has no loss plugin and no reference; "
                         "drop it, or pass --objective dpo for preference metrics")
    backend = resolve_backend(request.backend, catalog)
    dtype = resolve_dtype(request.dtype, backend)
    policy_spec = model_dir(request.model)
    resolve_source(policy_spec)
    policy, tokenizer = load_model(policy_spec, run.get("seed", request.seed),
                                   trust_remote_code=request.trust_remote_code)
    examples, stats = held_out(request, run, catalog, tokenizer, "sft")
    device = backend.device(0)
    disable_dropout(policy)
    policy.requires_grad_(False).eval().to(device)
    paths = sft_paths(resolve(policy, static_shapes=backend.static_shapes,
                              backend_name=backend.name))
    batch = collate_examples(examples[:CHECK_PAIRS], tokenizer.pad_token_id,
                             pad_length=backend.padded_length).to(device)
    paths, report = check(policy, batch, paths, training=False)
    objective = SftObjective(backend, dtype, tokenizer.pad_token_id, paths)
    metrics = objective_metrics(objective, policy, examples, request.batch_size, device)
    return {
        "objective": "sft",
        "model": policy_spec,
        "ref": None,
        "data": request.data,
        "examples": len(examples),
        "data_stats": stats.as_dict(),
        "backend": backend.name,
        "dtype": str(dtype).removeprefix("torch."),
        "paths": {"policy": paths.used()},
        "paths_check": {"policy": report.record()},
        "metrics": {k.removeprefix("eval/"): v for k, v in metrics.items()},
    }


@dataclass
class TasksRequest:
    """``dpo eval --tasks``: one model on lm-eval harness tasks."""

    model: str
    backend: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    limit: int | None = None  # the first examples of each task only
    num_fewshot: int | None = None  # default: each task's own (0 where it sets none)
    output: str | None = None  # the results file; default: in the model's run directory
    trust_remote_code: bool = False
    seed: int = 42


def evaluate_tasks(request: TasksRequest, suite: TaskSuite, catalog: Catalog) -> dict[str, Any]:
    """The model's scores on ``suite`` (the lm-eval harness), on the request's backend and
    dtype; the harness's results go to ``request.output``, else into the run directory the
    model belongs to (``tasks.results_file_of``), else nowhere."""
    run = find_run_config(request.model) or {}
    backend = resolve_backend(request.backend, catalog)
    dtype = resolve_dtype(request.dtype, backend)
    spec = model_dir(request.model)
    resolve_source(spec)
    target = Path(request.output) if request.output else results_file_of(request.model)
    if target is not None and target.is_dir():
        raise UsageError(f"--output {target}: is a directory; give a file name for the results")
    model, tokenizer = load_model(spec, run.get("seed", request.seed),
                                  trust_remote_code=request.trust_remote_code)
    device = backend.device(0)
    disable_dropout(model)
    model.requires_grad_(False).eval().to(device)
    backend.configure_model(model)
    lm = harness_lm(model, tokenizer, backend, dtype, device, request.batch_size)
    results = suite.evaluate(lm, limit=request.limit, num_fewshot=request.num_fewshot)
    about = {"model": spec, "backend": backend.name,
             "dtype": str(dtype).removeprefix("torch."), "limit": request.limit,
             "num_fewshot": request.num_fewshot, "max_length": lm.max_length}
    document = results_document(results, about)
    if target is not None:
        write_results(target, document)
    return {**about, "file": str(target) if target else None, "metrics": document["metrics"],
            "n-samples": document.get("n-samples", {})}
