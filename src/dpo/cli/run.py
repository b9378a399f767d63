"""``dpo run``: train a policy on preference pairs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from dpo.cli.common import one_line_errors
from dpo.core.training import strategy as strat
from dpo.core.interfaces.errors import DpoError, UsageError
from dpo.core.training.config import RunConfig, read_config_file, resolve_config, with_preset
from dpo.core.training.demo import DEMO_PRESET
from dpo.core.interfaces.options import parse_assignments
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.rundir import check_output, nothing_to_resume, read_record
from dpo.core.training.run import recorded_config, run

DATA = "Data"
OPTIM = "Optimisation"
OUT = "Output"
SCALE = "Many processes"
SPEED = "Speed and memory"
# Set by the --nproc launcher for its workers: each writes its exit code to DIR/rank-N.
EXIT_DIR_ENV = "DPO_EXIT_DIR"
# torchrun's own report once a worker has failed (its log lines, then a traceback).
_TORCHRUN_TAIL = re.compile(r"torch/distributed/(elastic|run\.py)")


def shown_value(value: Any) -> str:
    """A configuration value as ``--help`` writes it (switches as on/off, as the flags say)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def config_default(name: str, unset: str | None = None) -> str:
    """The default of option ``name`` as ``--help`` shows it, read from RunConfig so that help
    and behaviour cannot drift: its value, or ``unset`` (what happens instead) where RunConfig
    leaves it None; then the demo preset's value where that differs (the demo is the default
    data)."""
    value = RunConfig.model_fields[name].get_default(call_default_factory=True)
    if value is None:
        if unset is None:
            raise ValueError(f"{name}: RunConfig leaves it unset; say what happens instead")
        shown = unset
    else:
        shown = shown_value(value)
    if name in DEMO_PRESET and DEMO_PRESET[name] != value:
        shown += f"; {shown_value(DEMO_PRESET[name])} with --data demo"
    return shown


def with_default(text: str, name: str, unset: str | None = None) -> str:
    """``text`` and the default of option ``name`` (``config_default``), as a help text: the
    brackets escaped, or rich's help would take them for markup and drop them."""
    return f"{text} {escape(f'[default: {config_default(name, unset)}]')}"


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("run")
    @one_line_errors
    def run_command(
        ctx: typer.Context,
        model: Annotated[Optional[str], typer.Option(help=with_default("The model to train: SmolLM2-135M-Instruct, a .gguf file, a local Hugging Face model directory, a hub id, or 'tiny'.", "model"))] = None,
        ref_model: Annotated[Optional[str], typer.Option(help=with_default("Reference model (same kinds as --model).", "ref_model", "a frozen copy of --model"))] = None,
        precompute_ref: Annotated[Optional[bool], typer.Option("--precompute-ref/--no-precompute-ref", help=with_default("Score every pair with the reference once before training and keep the log-probs on disk (then the reference is not in memory while training); off: a frozen reference model scores each batch.", "precompute_ref"))] = None,
        ref_logps: Annotated[Optional[str], typer.Option(help=with_default("File of precomputed reference log-probs (see `dpo precompute-ref`).", "ref_logps", "the cache directory, one file per reference model"))] = None,
        data: Annotated[Optional[str], typer.Option(help=with_default("Training pairs: JSONL or JSONL.gz, a datasets name, or 'demo' (the built-in demo task, with its own held-out split and preset hyperparameters).", "data"), rich_help_panel=DATA)] = None,
        format: Annotated[Optional[str], typer.Option("--format", help=with_default("Data format (see `dpo plugins`).", "format", "auto-detected"), rich_help_panel=DATA)] = None,
        eval_data: Annotated[Optional[str], typer.Option(help=with_default("Held-out pairs for evaluation.", "eval_data", "none"), rich_help_panel=DATA)] = None,
        eval_fraction: Annotated[Optional[float], typer.Option(help=with_default("Hold out this share of --data instead.", "eval_fraction"), rich_help_panel=DATA)] = None,
        max_length: Annotated[Optional[int], typer.Option(help=with_default("Prompt + completion tokens, at most.", "max_length"), rich_help_panel=DATA)] = None,
        max_prompt_length: Annotated[Optional[int], typer.Option(help=with_default("Prompt tokens kept (the last ones).", "max_prompt_length"), rich_help_panel=DATA)] = None,
        strict: Annotated[Optional[bool], typer.Option("--strict/--no-strict", help=with_default("Refuse unusable records (empty or identical completions, over-long prompts, ...) with file:line instead of dropping and counting them.", "strict"), rich_help_panel=DATA)] = None,
        backend: Annotated[Optional[str], typer.Option(help=with_default("cpu, cuda, rocm, xpu, xla or auto (see `dpo backends`).", "backend"))] = None,
        nproc: Annotated[Optional[int], typer.Option(help="Launch N processes with torchrun (one per accelerator device; CPU processes share the host). " + escape("[default: this process alone]"), rich_help_panel=SCALE)] = None,
        strategy: Annotated[Optional[str], typer.Option(help=with_default("With several processes: ddp (a replica per process) or fsdp (FSDP2: policy and reference sharded).", "strategy"), rich_help_panel=SCALE)] = None,
        dtype: Annotated[Optional[str], typer.Option(help=with_default("auto, float32, bfloat16 or float16.", "dtype"))] = None,
        loss: Annotated[Optional[str], typer.Option(help=with_default("Preference loss (see `dpo plugins`).", "loss"))] = None,
        option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Plugin option key=value; plain keys go to the loss, plugin.key=value to another plugin (e.g. -o beta=0.1).")] = None,
        stop: Annotated[Optional[list[str]], typer.Option(help=with_default("Stopping policy, repeatable.", "stop"))] = None,
        max_steps: Annotated[Optional[int], typer.Option(help=with_default("Optimizer steps (0: --epochs decide).", "max_steps"), rich_help_panel=OPTIM)] = None,
        epochs: Annotated[Optional[float], typer.Option(help=with_default("Passes over the data.", "epochs"), rich_help_panel=OPTIM)] = None,
        batch_size: Annotated[Optional[int], typer.Option(help=with_default("Pairs per micro-batch.", "batch_size"), rich_help_panel=OPTIM)] = None,
        grad_accum: Annotated[Optional[int], typer.Option(help=with_default("Micro-batches per optimizer step.", "grad_accum"), rich_help_panel=OPTIM)] = None,
        lr: Annotated[Optional[float], typer.Option(help=with_default("Peak learning rate (AdamW).", "lr"), rich_help_panel=OPTIM)] = None,
        weight_decay: Annotated[Optional[float], typer.Option(help=with_default("AdamW weight decay.", "weight_decay"), rich_help_panel=OPTIM)] = None,
        warmup_steps: Annotated[Optional[int], typer.Option(help=with_default("Linear warmup steps (0: --warmup-ratio).", "warmup_steps"), rich_help_panel=OPTIM)] = None,
        warmup_ratio: Annotated[Optional[float], typer.Option(help=with_default("Warmup share of all steps.", "warmup_ratio"), rich_help_panel=OPTIM)] = None,
        scheduler: Annotated[Optional[str], typer.Option(help=with_default("linear, cosine or constant decay.", "scheduler"), rich_help_panel=OPTIM)] = None,
        max_grad_norm: Annotated[Optional[float], typer.Option(help=with_default("Gradient clipping norm (0: off).", "max_grad_norm"), rich_help_panel=OPTIM)] = None,
        seed: Annotated[Optional[int], typer.Option(help=with_default("Random seed.", "seed"), rich_help_panel=OPTIM)] = None,
        shuffle: Annotated[Optional[bool], typer.Option("--shuffle/--no-shuffle", help=with_default("A new order of the pairs every epoch (off: file order).", "shuffle"), rich_help_panel=OPTIM)] = None,
        group_by_length: Annotated[Optional[bool], typer.Option("--group-by-length/--no-group-by-length", help=with_default("Batches of pairs of similar length: less padding.", "group_by_length"), rich_help_panel=OPTIM)] = None,
        gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help=with_default("Recompute each decoder layer's activations in backward: less memory, about a third more compute.", "gradient_checkpointing"), rich_help_panel=SPEED)] = None,
        share_prompt: Annotated[Optional[bool], typer.Option("--share-prompt/--no-share-prompt", help=with_default("Run each pair's prompt once for both completions, with no padding (a forward per pair instead of one per batch).", "share_prompt", "on where the backend gains from it (CPU)"), rich_help_panel=SPEED)] = None,
        compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help=with_default("torch.compile the decoder layers (the first steps of each new shape compile).", "compile"), rich_help_panel=SPEED)] = None,
        output: Annotated[Optional[str], typer.Option(help=with_default("Run directory.", "output"), rich_help_panel=OUT)] = None,
        eval_steps: Annotated[Optional[int], typer.Option(help=with_default("Evaluate every N steps (0: at the end).", "eval_steps"), rich_help_panel=OUT)] = None,
        eval_at_start: Annotated[Optional[bool], typer.Option("--eval-at-start/--no-eval-at-start", help=with_default("Evaluate once before training: the baseline.", "eval_at_start"), rich_help_panel=OUT)] = None,
        save_steps: Annotated[Optional[int], typer.Option(help=with_default("Checkpoint every N steps (0: at the end).", "save_steps"), rich_help_panel=OUT)] = None,
        save_total_limit: Annotated[Optional[int], typer.Option(help=with_default("Checkpoints kept.", "save_total_limit"), rich_help_panel=OUT)] = None,
        keep_checkpoints: Annotated[Optional[bool], typer.Option("--keep-checkpoints/--no-keep-checkpoints", help=with_default("Keep the checkpoints once the run is complete, so that --resume with more --max-steps can extend it (off: only final/ remains).", "keep_checkpoints"), rich_help_panel=OUT)] = None,
        progress: Annotated[Optional[bool], typer.Option("--progress/--no-progress", help=with_default("Progress of the reference pass and of training: a live bar on a terminal; elsewhere (a log) a plain line at most every 30 s (DPO_PROGRESS_INTERVAL sets the seconds).", "progress"), rich_help_panel=OUT)] = None,
        config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with any of these options; flags win.")] = None,
        resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this directory from its newest checkpoint.", rich_help_panel=OUT)] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.", rich_help_panel=OUT)] = False,
    ) -> None:
        """Train a policy on preference pairs with DPO or a relative.

        Options come from defaults, then --config, then flags. The run directory gets
        run.json, metrics.jsonl, checkpoint-N/ and final/ (a Hugging Face model directory).
        """
        flags = {
            "model": model, "ref_model": ref_model, "precompute_ref": precompute_ref,
            "ref_logps": ref_logps, "shuffle": shuffle, "group_by_length": group_by_length,
            "gradient_checkpointing": gradient_checkpointing, "compile": compile,
            "share_prompt": share_prompt, "data": data, "format": format, "eval_data": eval_data,
            "eval_fraction": eval_fraction, "max_length": max_length,
            "max_prompt_length": max_prompt_length, "strict": strict, "backend": backend,
            "strategy": strategy, "dtype": dtype,
            "loss": loss, "stop": stop, "max_steps": max_steps, "epochs": epochs,
            "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
            "weight_decay": weight_decay, "warmup_steps": warmup_steps,
            "warmup_ratio": warmup_ratio, "scheduler": scheduler, "max_grad_norm": max_grad_norm,
            "seed": seed, "output": output, "eval_steps": eval_steps,
            "eval_at_start": eval_at_start, "save_steps": save_steps,
            "save_total_limit": save_total_limit, "keep_checkpoints": keep_checkpoints,
            "progress": progress,
            "options": parse_assignments(option or []),
        }
        layers = []
        if resume is not None:
            # A resumed run starts from its recorded configuration; flags given now still win.
            check_output(resume, "--resume")
            layers.append(recorded_config(resume))
            flags["output"] = str(resume)
        if config is not None:
            layers.append(read_config_file(config))
        layers = layers if resume is not None else with_preset([*layers, flags])[:-1]
        resolved = resolve_config(*layers, flags)
        if resume is not None and _already_complete(resume, resolved):
            return
        if nproc is not None:
            raise typer.Exit(launch(nproc, resolved, catalog, ctx))
        with _exit_code_recorded():
            outcome = run(resolved, catalog, resume=resume is not None, overwrite=overwrite)
            if not outcome.saved:
                # Stopped by a policy that distrusts the weights (e.g. nan-guard): a failed run.
                raise typer.Exit(1)


def _already_complete(output: Path, config: Any) -> bool:
    """``--resume`` of a run that has ended, asking for no more steps: say so, and leave its
    record as it is."""
    try:
        record = read_record(output)
    except UsageError:
        return False
    if not nothing_to_resume(record, output, config.model_dump()):
        return False
    print(f"{output}: the run is already complete ({record['status']}, {record.get('steps')} "
          f"steps); its model is in {output / 'final'}", file=sys.stderr)
    return True


class _exit_code_recorded:
    """Under the --nproc launcher, leave this worker's exit code where the launcher reads it;
    ranks other than 0 stay silent on input errors, which every rank finds alike."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        rank = int(os.environ.get("RANK", 0))
        code = 0
        if isinstance(exc, DpoError):
            code = exc.exit_code
        elif isinstance(exc, typer.Exit):
            code = exc.exit_code
        elif exc is not None:
            code = 1
        directory = os.environ.get(EXIT_DIR_ENV)
        if directory and strat.launched_by_torchrun():
            Path(directory, f"rank-{rank}").write_text(f"{code}\n")
        if isinstance(exc, UsageError) and rank != 0:
            raise typer.Exit(code) from None
        return False


def launch(nproc: int, config: Any, catalog: Catalog, ctx: typer.Context) -> int:
    """``dpo run --nproc N ARGS``: ``torchrun --nproc-per-node N -m dpo run ARGS``; the exit code
    is the failing worker's (rank 0's first), else torchrun's."""
    from dpo.core.training.run import resolve_backend

    if strat.launched_by_torchrun():
        raise UsageError("--nproc: this process already runs under torchrun; drop --nproc")
    backend = resolve_backend(config.backend, catalog)
    strat.check_launch(nproc, backend.name, backend.device_count(), backend.name != "cpu")
    args = _command_line_args(ctx, skip={"nproc"})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "-m", "dpo", "run", *args]
    with tempfile.TemporaryDirectory(prefix="dpo-exit-") as exits:
        env = dict(os.environ, **{EXIT_DIR_ENV: exits})
        env.setdefault("OMP_NUM_THREADS", "1")
        if sys.stderr.isatty():  # the workers' output is piped through here: keep it rich
            env.setdefault("TTY_COMPATIBLE", "1")
            env.setdefault("TTY_INTERACTIVE", "1")
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        quiet = False
        assert process.stderr is not None
        for line in process.stderr:
            # Once torchrun reports a failed worker, the worker has said what went wrong.
            quiet = quiet or bool(_TORCHRUN_TAIL.search(line))
            if not quiet:
                sys.stderr.write(line)
                sys.stderr.flush()
        status = process.wait()
        codes = {}
        for path in Path(exits).glob("rank-*"):
            codes[int(path.name.removeprefix("rank-"))] = int(path.read_text() or 1)
    failed = [codes[r] for r in sorted(codes) if codes[r]]
    if failed:
        return failed[0]
    if status and quiet:
        print(f"error: torchrun failed (exit {status})", file=sys.stderr)
    return status


def _command_line_args(ctx: typer.Context, skip: set[str]) -> list[str]:
    """The options given on the command line, as arguments again (for the workers)."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.param_type_name != "option" or param.name in skip or param.name is None:
            continue
        source = ctx.get_parameter_source(param.name)
        if getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if param.secondary_opts and not value:
                args.append(param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
            continue
        for item in (value if param.multiple else [value]):
            args += [param.opts[0], str(item)]
    return args
