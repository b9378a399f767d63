"""``dpo sample``: what a model says to held-out prompts, beside their chosen and rejected
answers."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.text import Text

from dpo.cli.common import one_line_errors
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.report import log_console
from dpo.core.training.samples import (DEFAULT_MAX_NEW_TOKENS, Sample, SampleRequest,
                                       check_samples_output, sample_request, write_samples_file)


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("sample")
    @one_line_errors
    def sample_command(
        model: Annotated[str, typer.Option(help="The model: a run directory, a model directory, a LoRA adapter directory, a .gguf file, a hub id or 'tiny'.")],
        data: Annotated[str, typer.Option(help="Held-out pairs or demonstrations (JSONL or JSONL.gz, any installed format), or 'demo' (the demo's held-out questions); the first N are the prompts.")],
        count: Annotated[int, typer.Option("-n", "--count", min=1, help="Prompts to complete: the first N of --data.")] = 4,
        max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per prompt, at most (fewer where the end-of-sequence token comes first).")] = DEFAULT_MAX_NEW_TOKENS,
        temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy; above: sampled at this temperature, seeded by --seed.")] = 0.0,
        seed: Annotated[Optional[int], typer.Option(help="Seed of sampled completions. " + escape("[default: the run's, else 42]"))] = None,
        output: Annotated[Optional[str], typer.Option(help="Also write the completions to this new JSONL file (the lines of a run's samples.jsonl).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of readable text.")] = False,
        trust_remote_code: Annotated[bool, typer.Option(help="Run the modelling code that --model ships in its directory or hub repository (e.g. BTLM's): Python from there runs here, so only for a model you trust.")] = False,
        format: Annotated[Optional[str], typer.Option("--format", help="Data format (see `dpo plugins`). " + escape("[default: auto-detected]"))] = None,
        objective: Annotated[Optional[str], typer.Option(help="dpo (--data holds pairs) or sft (demonstrations, or pairs' chosen sides). " + escape("[default: the run's, else dpo]"))] = None,
        backend: Annotated[str, typer.Option(help="cpu, cuda, rocm, xpu, xla or auto.")] = "auto",
        max_length: Annotated[Optional[int], typer.Option(help="Prompt + completion tokens, as a run cuts them. " + escape("[default: the run's, else 512]"))] = None,
        max_prompt_length: Annotated[Optional[int], typer.Option(help="Prompt tokens kept (the last ones). " + escape("[default: the run's, else 256]"))] = None,
        strict: Annotated[bool, typer.Option(help="Refuse unusable records instead of dropping them.")] = False,
    ) -> None:
        """Completions of the first N prompts of held-out data by a model, shown beside the
        data's chosen and rejected answers: the same generations a run with --sample-prompts
        writes to samples.jsonl."""
        path = check_samples_output(output) if output is not None else None
        request = SampleRequest(model=model, data=data, count=count,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed, format=format, backend=backend,
                                max_length=max_length, max_prompt_length=max_prompt_length,
                                strict=strict, objective=objective,
                                trust_remote_code=trust_remote_code)
        console = log_console()
        samples = sample_request(request, catalog,
                                 note=lambda message: console.print(message, markup=False))
        if path is not None:
            write_samples_file(path, samples)
        if as_json:
            for sample in samples:
                sys.stdout.write(json.dumps(sample.as_dict(), ensure_ascii=False) + "\n")
            return
        show(samples)


def show(samples: list[Sample]) -> None:
    """Each prompt, its answers and the model's completion, readably (text, never markup)."""
    console = log_console(stderr=False)
    for sample in samples:
        step = f", step {sample.step}" if sample.step is not None else ""
        console.print(Text(f"── prompt {sample.index}{step} ──", style="bold"))
        answers = ("chosen", "rejected") if sample.label is None else ("desirable",
                                                                        "undesirable")
        for label, text in (("prompt", sample.prompt), (answers[0], sample.chosen),
                            (answers[1], sample.rejected), ("completion", sample.completion)):
            if text is None:
                continue
            console.print(Text(f"{label}:", style="bold"))
            console.print(Text(text), highlight=False)
