"""``dpo eval``: preference metrics of a trained policy against its reference."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from dpo.cli.common import one_line_errors
from dpo.core.training.config import DTYPES
from dpo.core.interfaces.errors import UsageError
from dpo.core.training.evaluation import EvalRequest, evaluate_request
from dpo.core.interfaces.options import parse_assignments
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.report import SUMMARY_KEYS, _fmt, log_console


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("eval")
    @one_line_errors
    def eval_command(
        model: Annotated[str, typer.Option(help="The policy: a run directory, a model directory, a .gguf file, a hub id or 'tiny'.")],
        data: Annotated[str, typer.Option(help="Held-out pairs (JSONL or JSONL.gz, any installed format).")],
        ref: Annotated[Optional[str], typer.Option(help="The reference model. " + escape("[default: the run's starting model, when --model is a run directory]"))] = None,
        trust_remote_code: Annotated[bool, typer.Option(help="Run the modelling code that --model (and --ref) ships in its directory or hub repository (e.g. BTLM's): Python from there runs here, so only for a model you trust. Asked for each evaluation, whatever the run did.")] = False,
        loss: Annotated[Optional[str], typer.Option(help="Loss whose rewards are reported. " + escape("[default: the run's, else dpo]"))] = None,
        option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Loss option key=value (e.g. -o beta=0.1). " + escape("[default: the run's]"))] = None,
        format: Annotated[Optional[str], typer.Option("--format", help="Data format (see `dpo plugins`). " + escape("[default: auto-detected]"))] = None,
        backend: Annotated[str, typer.Option(help="cpu, cuda, rocm, xpu, xla or auto.")] = "auto",
        dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
        batch_size: Annotated[int, typer.Option(min=1, help="Pairs per forward pass.")] = 8,
        max_length: Annotated[Optional[int], typer.Option(help="Prompt + completion tokens. " + escape("[default: the run's, else 512]"))] = None,
        max_prompt_length: Annotated[Optional[int], typer.Option(help="Prompt tokens kept. " + escape("[default: the run's, else 256]"))] = None,
        strict: Annotated[bool, typer.Option(help="Refuse unusable records instead of dropping them.")] = False,
        objective: Annotated[Optional[str], typer.Option(help="dpo (preference metrics on pairs) or sft (loss and perplexity on demonstrations, or pairs' chosen sides). " + escape("[default: the run's, else dpo]"))] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """Preference metrics (rewards/accuracies, margins, chosen and rejected rewards and
        log-probs) of a policy against its reference on held-out pairs; for an SFT model
        (--objective sft, the default for a `dpo sft` run), its loss and perplexity on
        held-out demonstrations."""
        if objective not in (None, "dpo", "sft"):
            raise UsageError(f"--objective {objective}: choose dpo or sft")
        if dtype not in DTYPES:
            raise UsageError(f"--dtype {dtype}: not a dtype; choose one of {', '.join(DTYPES)}")
        request = EvalRequest(model=model, data=data, ref=ref, loss=loss,
                              options=parse_assignments(option or []), format=format,
                              backend=backend, dtype=dtype, batch_size=batch_size,
                              max_length=max_length, max_prompt_length=max_prompt_length,
                              strict=strict, objective=objective,
                              trust_remote_code=trust_remote_code)
        result = evaluate_request(request, catalog)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        ref_text = f" against {result['ref']}" if result["ref"] else ""
        # Paths are text, not markup: "model[v2]" keeps its brackets.
        count = (f"{result['examples']} examples" if result["objective"] == "sft"
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
