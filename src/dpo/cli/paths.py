"""``dpo paths``: which speed paths each architecture is verified on, or which one model takes."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.table import Table

from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.report import log_console


def verified_rows() -> list[dict]:
    """One row per verified model type: its paths, window attributes and neutral values."""
    from dpo.core.model.paths import SPEED_PATHS
    from dpo.core.model.verified import VERIFIED

    return [{"model_type": name, "paths": [p for p in SPEED_PATHS if p in arch.paths],
             "window": list(arch.window),
             "neutral": {k: v for k, v in (*arch.neutral_head, *arch.neutral_embedding)}}
            for name, arch in sorted(VERIFIED.items())]


def model_paths(spec: str, backend_name: str, share_prompt: bool | None,
                gradient_checkpointing: bool, catalog: Catalog,
                trust_remote_code: bool = False) -> dict:
    """The paths ``spec`` takes in a run on the backend, and why each other one is off."""
    from dpo.core.model.loading import load_model
    from dpo.core.model.paths import SPEED_PATHS, architecture, resolve
    from dpo.core.training.run import resolve_backend

    backend = resolve_backend(backend_name, catalog)
    model, _ = load_model(spec, seed=0, trust_remote_code=trust_remote_code)
    paths = resolve(model, static_shapes=backend.static_shapes, share_prompt=share_prompt,
                    share_prompt_default=backend.share_prompt_default,
                    gradient_checkpointing=gradient_checkpointing, backend_name=backend.name)
    model_type, why = architecture(model)
    reasons = paths.reasons()
    return {"model": spec, "class": type(model).__name__, "model_type": model_type,
            "verified_architecture": why is None, "backend": backend.name,
            "window": paths.window,
            "paths": {name: {"on": getattr(paths, name), "why_off": reasons.get(name)}
                      for name in SPEED_PATHS}}


def register(app: typer.Typer, catalog: Catalog) -> None:
    from dpo.cli.common import one_line_errors

    @app.command("paths")
    @one_line_errors
    def paths(
        model: Annotated[Optional[str], typer.Option(help="A model, as for `dpo run`: show the paths it takes and why the others are off.")] = None,
        backend: Annotated[str, typer.Option(help="The backend of the run (with --model).")] = "auto",
        share_prompt: Annotated[Optional[bool], typer.Option("--share-prompt/--no-share-prompt", help="As for `dpo run` (with --model). [default: the backend's]")] = None,
        gradient_checkpointing: Annotated[bool, typer.Option(help="As for `dpo run` (with --model).")] = False,
        trust_remote_code: Annotated[bool, typer.Option(help="Run the modelling code that --model ships (e.g. BTLM's), as for `dpo run`.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """The speed paths of the log-prob computation: without --model, every architecture
        they are verified on; with --model, those that model takes in a run and why each other
        one is off. A run then checks them against the plain path on its first pairs."""
        if model is None:
            rows = verified_rows()
            if as_json:
                typer.echo(json.dumps(rows, indent=2))
                return
            table = Table(title=f"speed paths verified per architecture ({len(rows)} types)")
            for column in ("model type", "paths", "window from", "while"):
                table.add_column(column)
            for r in rows:
                table.add_row(r["model_type"], ", ".join(r["paths"]), ", ".join(r["window"]),
                              ", ".join(f"{k} = {v}" for k, v in r["neutral"].items()))
            log_console(stderr=False).print(table)
            return
        found = model_paths(model, backend, share_prompt, gradient_checkpointing, catalog,
                            trust_remote_code)
        if as_json:
            typer.echo(json.dumps(found, indent=2))
            return
        table = Table(title=f"{found['model']} ({found['class']}) on {found['backend']}")
        table.add_column("speed path")
        table.add_column("taken")
        table.add_column("why not")
        for name, entry in found["paths"].items():
            table.add_row(name, "yes" if entry["on"] else "no", entry["why_off"] or "")
        log_console(stderr=False).print(table)
        if found["window"] is not None:
            log_console(stderr=False).print(f"attention window {found['window']}: shared-prompt groups fit in it")
