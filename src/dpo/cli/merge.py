"""``dpo merge``: a LoRA run's adapter merged into its base model, a plain transformers model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dpo.cli.common import one_line_errors
from dpo.core.interfaces.plugins import Catalog


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("merge")
    @one_line_errors
    def merge_command(
        path: Annotated[Path, typer.Argument(help="A run directory trained with --lora (its final/), or an adapter directory.")],
        output: Annotated[Optional[Path], typer.Option(help="Where to write the merged model. [default: merged/ in the run directory]")] = None,
        trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code/--no-trust-remote-code", help="Run the modelling code the base model ships (e.g. BTLM).")] = False,
    ) -> None:
        """Merge a LoRA adapter into its base model (W + B A alpha / r) and write the result as a
        plain transformers model directory, which loads without peft. The base model is the one
        the run trained on (named in the adapter's dpo_adapter.json)."""
        from dpo.core.training.merging import merge_adapter, merge_target

        adapter, target = merge_target(path, output)
        merged = merge_adapter(adapter, target, trust_remote_code=trust_remote_code)
        typer.echo(f"merged {adapter} into its base model -> {merged}")
