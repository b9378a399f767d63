"""``dpo precompute-ref``: score the pairs with the reference model once, into a file that later
runs (any loss, beta or learning rate) read instead of keeping a reference model in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dpo.cli.common import one_line_errors
from dpo.cli.training_options import with_default
from dpo.core.training.config import read_config_file, resolve_config, with_preset
from dpo.core.interfaces.options import parse_assignments
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.run import precompute


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("precompute-ref")
    @one_line_errors
    def precompute_command(
        model: Annotated[Optional[str], typer.Option(help=with_default("The model to be trained, as for `dpo run` (its tokenizer; and the reference unless --ref-model).", "model"))] = None,
        ref_model: Annotated[Optional[str], typer.Option(help=with_default("Reference model.", "ref_model", "--model's initial weights"))] = None,
        trust_remote_code: Annotated[Optional[bool], typer.Option("--trust-remote-code/--no-trust-remote-code", help=with_default("Run the modelling code that --model (and --ref-model) ships in its directory or hub repository (e.g. BTLM's), as for `dpo run`.", "trust_remote_code"))] = None,
        data: Annotated[Optional[str], typer.Option(help=with_default("Training pairs, as for `dpo run`.", "data"))] = None,
        format: Annotated[Optional[str], typer.Option("--format", help=with_default("Data format (see `dpo plugins`).", "format", "auto-detected"))] = None,
        eval_data: Annotated[Optional[str], typer.Option(help=with_default("Held-out pairs (scored too).", "eval_data", "none"))] = None,
        eval_fraction: Annotated[Optional[float], typer.Option(help=with_default("Held-out share of --data, as for `dpo run` (same --seed, same split).", "eval_fraction"))] = None,
        max_length: Annotated[Optional[int], typer.Option(help=with_default("As for `dpo run`.", "max_length"))] = None,
        max_prompt_length: Annotated[Optional[int], typer.Option(help=with_default("As for `dpo run`.", "max_prompt_length"))] = None,
        strict: Annotated[Optional[bool], typer.Option("--strict/--no-strict", help=with_default("Refuse unusable records instead of dropping them.", "strict"))] = None,
        backend: Annotated[Optional[str], typer.Option(help=with_default("cpu, cuda, rocm, xpu, xla or auto.", "backend"))] = None,
        dtype: Annotated[Optional[str], typer.Option(help=with_default("Compute dtype; a run in another dtype needs its own file.", "dtype"))] = None,
        batch_size: Annotated[Optional[int], typer.Option(help=with_default("Pairs per forward pass.", "batch_size"))] = None,
        option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Data format options (format.key=value).")] = None,
        seed: Annotated[Optional[int], typer.Option(help=with_default("Seed of the --eval-fraction split.", "seed"))] = None,
        ref_logps: Annotated[Optional[str], typer.Option(help=with_default("The file to write or complete.", "ref_logps", "the cache directory, one file per reference model, where `dpo run` finds it"))] = None,
        config: Annotated[Optional[Path], typer.Option("--config", help="A `dpo run` TOML file; its data, model and length options apply, flags win.")] = None,
        progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help=with_default("Progress of the pass: a live bar on a terminal; elsewhere (a log) a plain line at most every 30 s (DPO_PROGRESS_INTERVAL sets the seconds).", "progress"))] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Score every pair (training and held out) with the reference model once and keep the
        log-probs on disk. Pairs already in the file are not scored again; a file made with
        other reference weights or another dtype is rebuilt."""
        flags = {"model": model, "ref_model": ref_model, "trust_remote_code": trust_remote_code,
                 "data": data, "format": format,
                 "eval_data": eval_data, "eval_fraction": eval_fraction,
                 "max_length": max_length, "max_prompt_length": max_prompt_length,
                 "strict": strict, "backend": backend, "dtype": dtype, "batch_size": batch_size,
                 "seed": seed, "ref_logps": ref_logps, "progress": progress,
                 "options": parse_assignments(option or [])}
        layers = [read_config_file(config)] if config is not None else []
        resolved = resolve_config(*with_preset([*layers, flags])[:-1], flags)
        result = precompute(resolved, catalog)
        if as_json:
            typer.echo(json.dumps(result, indent=2))
            return
        typer.echo(f"{result['path']}: {result['pairs']} pairs ({result['computed']} scored now, "
                   f"{result['pairs_in_file']} in the file), reference {result['reference']}, "
                   f"{result['dtype']}, {result['seconds']:.1f} s")
