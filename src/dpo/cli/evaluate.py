"""``dpo eval``: preference metrics of a trained policy against its reference, and downstream
benchmarks through the lm-eval harness (``--tasks``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from dpo.cli.common import one_line_errors
from dpo.core.training.config import DTYPES
from dpo.core.interfaces.errors import UsageError
from dpo.core.training.evaluation import (EvalRequest, TasksRequest, evaluate_request,
                                          evaluate_tasks)
from dpo.core.training.tasks import TaskSuite, split_tasks
from dpo.core.interfaces.options import parse_assignments
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.report import SUMMARY_KEYS, _fmt, log_console


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("eval")
    @one_line_errors
    def eval_command(
        model: Annotated[list[str], typer.Option(help="The policy: a run directory, a model directory, a .gguf file, a hub id or 'tiny'. Repeat it to compare several models on --tasks side by side.")],
        data: Annotated[Optional[str], typer.Option(help="Held-out pairs (JSONL or JSONL.gz, any installed format). Needed unless --tasks is given. " + escape("[default: none]"))] = None,
        ref: Annotated[Optional[str], typer.Option(help="The reference model. " + escape("[default: the run's starting model, when --model is a run directory]"))] = None,
        trust_remote_code: Annotated[bool, typer.Option(help="Run the modelling code that --model (and --ref) ships in its directory or hub repository (e.g. BTLM's): Python from there runs here, so only for a model you trust. Asked for each evaluation, whatever the run did.")] = False,
        loss: Annotated[Optional[str], typer.Option(help="Loss whose rewards are reported. " + escape("[default: the run's, else dpo]"))] = None,
        option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Loss option key=value (e.g. -o beta=0.1). " + escape("[default: the run's]"))] = None,
        format: Annotated[Optional[str], typer.Option("--format", help="Data format (see `dpo plugins`). " + escape("[default: auto-detected]"))] = None,
        backend: Annotated[str, typer.Option(help="cpu, cuda, rocm, xpu, xla or auto.")] = "auto",
        dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
        batch_size: Annotated[int, typer.Option(min=1, help="Pairs (with --tasks: the harness's requests) per forward pass.")] = 8,
        max_length: Annotated[Optional[int], typer.Option(help="Prompt + completion tokens. " + escape("[default: the run's, else 512]"))] = None,
        max_prompt_length: Annotated[Optional[int], typer.Option(help="Prompt tokens kept. " + escape("[default: the run's, else 256]"))] = None,
        strict: Annotated[bool, typer.Option(help="Refuse unusable records instead of dropping them.")] = False,
        objective: Annotated[Optional[str], typer.Option(help="dpo (preference metrics on pairs) or sft (loss and perplexity on demonstrations, or pairs' chosen sides). " + escape("[default: the run's, else dpo]"))] = None,
        tasks: Annotated[Optional[str], typer.Option(help="Downstream benchmarks through EleutherAI's lm-eval harness, comma-separated: task or group names (hellaswag,arc_easy), directories of the harness's task YAML files, or YAML files. Needs `pip install " + escape("'dpo-trainer[eval]'`. [default: none]"), rich_help_panel="Benchmarks (lm-eval)")] = None,
        limit: Annotated[Optional[int], typer.Option(min=1, help="With --tasks: the first N examples of each task only (a quick look; the full tasks for numbers to report). " + escape("[default: every example]"), rich_help_panel="Benchmarks (lm-eval)")] = None,
        num_fewshot: Annotated[Optional[int], typer.Option(min=0, help="With --tasks: few-shot examples in each prompt. " + escape("[default: each task's own, else 0]"), rich_help_panel="Benchmarks (lm-eval)")] = None,
        output: Annotated[Optional[Path], typer.Option(help="With --tasks and one --model: write the harness's results (per task: metrics with stderr, config, versions, n-samples) to this JSON file. " + escape("[default: RUN/eval-tasks/<final, best or checkpoint-N>.json when --model is a run directory or one of its models, else none]"), rich_help_panel="Benchmarks (lm-eval)")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """Preference metrics (rewards/accuracies, margins, chosen and rejected rewards and
        log-probs) of a policy against its reference on held-out pairs; for an SFT model
        (--objective sft, the default for a `dpo sft` run), its loss and perplexity on
        held-out demonstrations. With --tasks, downstream benchmarks through EleutherAI's
        lm-eval harness, one column per --model."""
        if data is None and tasks is None:
            raise UsageError("give --data (held-out pairs) or --tasks (lm-eval benchmarks), or "
                             "both")
        if data is not None and len(model) > 1:
            raise UsageError(f"--model given {len(model)} times: preference metrics on --data "
                             "take one model; compare several models on --tasks alone")
        for flag, value in (("--limit", limit), ("--num-fewshot", num_fewshot),
                            ("--output", output)):
            if value is not None and tasks is None:
                raise UsageError(f"{flag}: an option of --tasks; add --tasks, or drop it")
        if output is not None and len(model) > 1:
            raise UsageError("--output: one results file per model; give one --model, or drop "
                             "--output (each run directory keeps its own results)")
        if objective not in (None, "dpo", "sft"):
            raise UsageError(f"--objective {objective}: choose dpo or sft")
        if dtype not in DTYPES:
            raise UsageError(f"--dtype {dtype}: not a dtype; choose one of {', '.join(DTYPES)}")
        # The tasks are checked (the extra installed, every name known) before any model loads.
        suite = TaskSuite(split_tasks(tasks)) if tasks is not None else None
        result = None
        if data is not None:
            request = EvalRequest(model=model[0], data=data, ref=ref, loss=loss,
                                  options=parse_assignments(option or []), format=format,
                                  backend=backend, dtype=dtype, batch_size=batch_size,
                                  max_length=max_length, max_prompt_length=max_prompt_length,
                                  strict=strict, objective=objective,
                                  trust_remote_code=trust_remote_code)
            result = evaluate_request(request, catalog)
        scores = []
        if suite is not None:
            scores = [evaluate_tasks(TasksRequest(
                model=spec, backend=backend, dtype=dtype, batch_size=batch_size, limit=limit,
                num_fewshot=num_fewshot, output=str(output) if output else None,
                trust_remote_code=trust_remote_code), suite, catalog) for spec in model]
        if as_json:
            shown = dict(result or {})
            if scores:
                shown["tasks"] = scores
            typer.echo(json.dumps(shown, indent=2))
            return
        if result is not None:
            show_preference(result)
        if scores:
            show_tasks(scores, model)


def show_preference(result: dict[str, Any]) -> None:
    ref_text = f" against {result['ref']}" if result["ref"] else ""
    # Paths are text, not markup: "model[v2]" keeps its brackets.
    count = (f"{result['examples']} examples" if "examples" in result
             else f"{result['pairs']} pairs")
    table = Table(title=escape(f"{result['model']}{ref_text}, {count}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in SUMMARY_KEYS:
        if key in result["metrics"]:
            table.add_row(key, _fmt(result["metrics"][key]))
    log_console(stderr=False).print(table)
    for label, used in result["paths"].items():
        log_console(stderr=False).print(f"{label} speed paths: {', '.join(used) or 'none (the plain path)'}",
                        markup=False)


def show_tasks(scores: list[dict[str, Any]], labels: list[str]) -> None:
    """One table: a row per task and metric; for one model a value and a stderr column, for
    several a column per model holding "value ± stderr"."""
    console = log_console(stderr=False)
    first = scores[0]
    limit = f", the first {first['limit']} examples of each task" if first["limit"] else ""
    table = Table(title=escape(f"lm-eval harness on {first['backend']} ({first['dtype']}){limit}"))
    table.add_column("task")
    table.add_column("metric")
    if len(scores) == 1:
        table.add_column("value", justify="right")
        table.add_column("± stderr", justify="right")
    else:
        for label in labels:
            table.add_column(escape(label), justify="right")
    rows: list[tuple[str, str]] = []
    for score in scores:
        for task, metrics in score["metrics"].items():
            rows += [(task, metric) for metric in metrics if (task, metric) not in rows]
    for task, metric in rows:
        cells = []
        for score in scores:
            entry = score["metrics"].get(task, {}).get(metric)
            value = "" if entry is None else f"{entry['value']:.4f}"
            stderr = "" if entry is None or entry["stderr"] is None else f"{entry['stderr']:.4f}"
            if len(scores) == 1:
                cells += [value, stderr]
            else:
                cells.append(f"{value} ± {stderr}" if stderr else value)
        table.add_row(escape(task), escape(metric), *cells)
    console.print(table)
    for score in scores:
        if score["file"]:
            console.print(f"results of {score['model']}: {score['file']}", markup=False)
