"""``dpo run``: train a policy on preference pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dpo.cli import one_line_errors
from dpo.core.config import read_config_file, resolve_config, with_preset
from dpo.core.options import parse_assignments
from dpo.core.plugins import Catalog
from dpo.core.run import read_run_record, run

DATA = "Data"
OPTIM = "Optimisation"
OUT = "Output"


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("run")
    @one_line_errors
    def run_command(
        model: Annotated[Optional[str], typer.Option(help="SmolLM2-135M-Instruct (the default), a .gguf file, a local Hugging Face model directory, a hub id, or 'tiny'.")] = None,
        ref_model: Annotated[Optional[str], typer.Option(help="Reference model (same kinds as --model). [default: a frozen copy of --model]")] = None,
        data: Annotated[Optional[str], typer.Option(help="Training pairs: JSONL or JSONL.gz, a datasets name, or 'demo' (the default: the built-in demo task, with its own held-out split and preset hyperparameters).", rich_help_panel=DATA)] = None,
        format: Annotated[Optional[str], typer.Option("--format", help="Data format (auto-detected when unset).", rich_help_panel=DATA)] = None,
        eval_data: Annotated[Optional[str], typer.Option(help="Held-out pairs for evaluation.", rich_help_panel=DATA)] = None,
        eval_fraction: Annotated[Optional[float], typer.Option(help="Hold out this share of --data instead.", rich_help_panel=DATA)] = None,
        max_length: Annotated[Optional[int], typer.Option(help="Prompt + completion tokens, at most. [default: 512]", rich_help_panel=DATA)] = None,
        max_prompt_length: Annotated[Optional[int], typer.Option(help="Prompt tokens kept (the last ones). [default: 256]", rich_help_panel=DATA)] = None,
        strict: Annotated[Optional[bool], typer.Option("--strict/--no-strict", help="Refuse unusable records (empty or identical completions, over-long prompts, ...) with file:line instead of dropping and counting them.", rich_help_panel=DATA)] = None,
        backend: Annotated[Optional[str], typer.Option(help="cpu, cuda, rocm, xpu, xla or auto (see `dpo backends`). [default: auto]")] = None,
        dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16 or float16. [default: auto]")] = None,
        loss: Annotated[Optional[str], typer.Option(help="Preference loss (see `dpo plugins`). [default: dpo]")] = None,
        option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Plugin option key=value; plain keys go to the loss, plugin.key=value to another plugin (e.g. -o beta=0.1).")] = None,
        stop: Annotated[Optional[list[str]], typer.Option(help="Stopping policy, repeatable. [default: nan-guard]")] = None,
        max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (0: --epochs decide).", rich_help_panel=OPTIM)] = None,
        epochs: Annotated[Optional[float], typer.Option(help="Passes over the data. [default: 1]", rich_help_panel=OPTIM)] = None,
        batch_size: Annotated[Optional[int], typer.Option(help="Pairs per micro-batch. [default: 4]", rich_help_panel=OPTIM)] = None,
        grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step. [default: 1]", rich_help_panel=OPTIM)] = None,
        lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW). [default: 1e-6]", rich_help_panel=OPTIM)] = None,
        weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay. [default: 0]", rich_help_panel=OPTIM)] = None,
        warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warmup steps (0: --warmup-ratio).", rich_help_panel=OPTIM)] = None,
        warmup_ratio: Annotated[Optional[float], typer.Option(help="Warmup share of all steps. [default: 0.1]", rich_help_panel=OPTIM)] = None,
        scheduler: Annotated[Optional[str], typer.Option(help="linear, cosine or constant decay. [default: linear]", rich_help_panel=OPTIM)] = None,
        max_grad_norm: Annotated[Optional[float], typer.Option(help="Gradient clipping norm (0: off). [default: 1]", rich_help_panel=OPTIM)] = None,
        seed: Annotated[Optional[int], typer.Option(help="Random seed. [default: 42]", rich_help_panel=OPTIM)] = None,
        output: Annotated[Optional[str], typer.Option(help="Run directory. [default: out]", rich_help_panel=OUT)] = None,
        eval_steps: Annotated[Optional[int], typer.Option(help="Evaluate every N steps (0: at the end).", rich_help_panel=OUT)] = None,
        eval_at_start: Annotated[Optional[bool], typer.Option("--eval-at-start/--no-eval-at-start", help="Evaluate once before training: the baseline. [default: on]", rich_help_panel=OUT)] = None,
        save_steps: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (0: at the end). [default: 100]", rich_help_panel=OUT)] = None,
        save_total_limit: Annotated[Optional[int], typer.Option(help="Checkpoints kept. [default: 2]", rich_help_panel=OUT)] = None,
        progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help="Live progress bar.", rich_help_panel=OUT)] = None,
        config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with any of these options; flags win.")] = None,
        resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from its newest checkpoint.", rich_help_panel=OUT)] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.", rich_help_panel=OUT)] = False,
    ) -> None:
        """Train a policy on preference pairs with DPO or a relative.

        Options come from defaults, then --config, then flags. The run directory gets
        run.json, metrics.jsonl, checkpoint-N/ and final/ (a Hugging Face model directory).
        """
        flags = {
            "model": model, "ref_model": ref_model, "data": data, "format": format, "eval_data": eval_data,
            "eval_fraction": eval_fraction, "max_length": max_length,
            "max_prompt_length": max_prompt_length, "strict": strict, "backend": backend, "dtype": dtype,
            "loss": loss, "stop": stop, "max_steps": max_steps, "epochs": epochs,
            "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
            "weight_decay": weight_decay, "warmup_steps": warmup_steps,
            "warmup_ratio": warmup_ratio, "scheduler": scheduler, "max_grad_norm": max_grad_norm,
            "seed": seed, "output": output, "eval_steps": eval_steps,
            "eval_at_start": eval_at_start, "save_steps": save_steps,
            "save_total_limit": save_total_limit, "progress": progress,
            "options": parse_assignments(option or []),
        }
        layers = []
        if resume is not None:
            # A resumed run starts from its recorded configuration; flags given now still win.
            recorded = read_run_record(resume)["config"]
            layers.append(recorded)
            flags["output"] = str(resume)
        if config is not None:
            layers.append(read_config_file(config))
        layers = layers if resume is not None else with_preset([*layers, flags])[:-1]
        outcome = run(resolve_config(*layers, flags), catalog, resume=resume is not None,
                      overwrite=overwrite)
        if not outcome.saved:
            # Stopped by a policy that distrusts the weights (e.g. nan-guard): a failed run.
            raise typer.Exit(1)
