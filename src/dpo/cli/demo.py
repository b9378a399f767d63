"""``dpo demo``: the demo task as a study of the starting model: SFT, then DPO from the SFT
model, then base, SFT and DPO compared on held-out questions (``dpo.core.training.study``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from dpo.cli.common import one_line_errors
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training import demo, study
from dpo.core.training.config import RunConfig
from dpo.core.training.report import log_console


DEFAULT_MODEL = RunConfig.model_fields["model"].default


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("demo")
    @one_line_errors
    def demo_command(
        output: Annotated[str, typer.Option(help="Directory of the study: sft/ and dpo/ (two run directories) and comparison.json.")] = "out",
        model: Annotated[Optional[str], typer.Option(help="The starting model (same kinds as `dpo run --model`). " + escape(f"[default: {DEFAULT_MODEL}]"))] = None,
        trust_remote_code: Annotated[bool, typer.Option(help="Run the modelling code that --model ships in its directory or hub repository (e.g. BTLM's), in both stages and the comparison: Python from there runs here, so only for a model you trust.")] = False,
        backend: Annotated[Optional[str], typer.Option(help="cpu, cuda, rocm, xpu, xla or auto (see `dpo backends`). " + escape("[default: auto]"))] = None,
        steps: Annotated[Optional[int], typer.Option(help="Optimizer steps of each stage. " + escape(f"[default: the demo presets': SFT {demo.SFT_DEMO_PRESET['max_steps']}, DPO {demo.DEMO_PRESET['max_steps']}]"))] = None,
        held_out: Annotated[int, typer.Option(help="Held-out questions the three models are compared on (the first ones of the demo's held-out split).")] = demo.EVAL_SIZE,
        overwrite: Annotated[bool, typer.Option(help="Train both stages again over an earlier study in --output (only what dpo wrote there is replaced).")] = False,
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress of each stage's training.")] = True,
    ) -> None:
        """The built-in demo as a study: SFT on the demo's right answers, DPO from the SFT
        model, then the base, SFT and DPO models compared on held-out questions: how often each
        ranks the right answer above the wrong one, and how often its own greedy reply is the
        right number."""
        request = study.StudyRequest(output=output, model=model, backend=backend, steps=steps,
                                     held_out=held_out, overwrite=overwrite, progress=progress,
                                     trust_remote_code=trust_remote_code)
        console = log_console()
        comparison = study.run_study(request, catalog,
                                     announce=lambda line: console.print(escape(line),
                                                                         highlight=False))
        show(comparison)


def show(comparison: study.Comparison) -> None:
    """The results table, a few held-out questions with each model's reply, and where the
    JSON went."""
    console = log_console(stderr=False)
    table = Table(title=f"{len(comparison.questions)} held-out questions")
    table.add_column("model")
    table.add_column("ranking accuracy", justify="right")
    table.add_column("answer accuracy", justify="right")
    table.add_column("answer form", justify="right")
    for score in comparison.scores:
        table.add_row(escape(f"{score.name} ({score.model})"), f"{score.ranking_accuracy:.3f}",
                      f"{score.answer_accuracy:.3f}", f"{score.answer_form:.3f}")
    console.print(table)
    replies = Table(title="greedy replies")
    replies.add_column("question")
    replies.add_column("right", justify="right")
    for score in comparison.scores:
        replies.add_column(score.name)
    for i, (question, answer) in enumerate(zip(comparison.questions, comparison.answers)):
        if i == study.SHOWN_QUESTIONS:
            break
        replies.add_row(escape(question), str(answer),
                        *(escape(shown_reply(s.replies[i])) for s in comparison.scores))
    console.print(replies)
    console.print(escape(f"written to {comparison.path}"), highlight=False)


def shown_reply(reply: str) -> str:
    """A reply on one line: line breaks shown as \\n, an empty reply as (nothing)."""
    return reply.replace("\n", "\\n") if reply else "(nothing)"
