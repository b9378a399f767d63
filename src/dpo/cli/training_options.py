"""The options of the training commands, ``dpo run`` (DPO on preference pairs) and ``dpo sft``
(supervised fine-tuning), each declared once.

``TRAINING_OPTIONS`` is a table of ``TrainingOption`` rows: a name (the callback's parameter,
and the RunConfig field where there is one), a type, the help text (one for every command, or
one per command), the help panel, Typer's flag declarations where the name's own ``--flag`` is
not all, and the commands that take the option. ``callback_for`` builds a command's callback
from it: a function whose ``__signature__`` lists that command's rows, which is what Typer
reads to make the options; the callback hands their values to the command's body as a dict.

A help text ends with the default a run takes, read from RunConfig and the command's
objective (``OBJECTIVE_DEFAULTS``, the demo preset), so that help and behaviour cannot drift.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Optional

import typer
from rich.markup import escape

from dpo.core.training.config import OBJECTIVE_DEFAULTS, RunConfig, demo_preset

RUN, SFT = "run", "sft"
# The objective (RunConfig.objective) each training command trains.
OBJECTIVE_OF: dict[str, str] = {RUN: "dpo", SFT: "sft"}
COMMAND_OF: dict[str, str] = {objective: command for command, objective in OBJECTIVE_OF.items()}

DATA = "Data"
OPTIM = "Optimisation"
OUT = "Output"
SCALE = "Many processes"
SPEED = "Speed and memory"
ADAPTER = "LoRA"
BENCH = "Benchmarks (lm-eval)"


def shown_value(value: Any) -> str:
    """A configuration value as ``--help`` writes it (switches as on/off, as the flags say)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def config_default(name: str, unset: str | None = None, objective: str = "dpo") -> str:
    """The default of option ``name`` as ``--help`` shows it for a run of ``objective``: its
    value (the objective's default over RunConfig's), or ``unset`` (what happens instead) where
    neither sets one; then the demo preset's value where that differs (the demo is the default
    data)."""
    value = OBJECTIVE_DEFAULTS[objective].get(
        name, RunConfig.model_fields[name].get_default(call_default_factory=True))
    if value is None:
        if unset is None:
            raise ValueError(f"{name}: RunConfig leaves it unset; say what happens instead")
        shown = unset
    else:
        shown = shown_value(value)
    preset = demo_preset(objective)
    if name in preset and preset[name] != value:
        shown += f"; {shown_value(preset[name])} with --data demo"
    return shown


def help_with_default(text: str, shown: str) -> str:
    """``text`` and a default as a help text: the brackets escaped, or rich's help would take
    them for markup and drop them."""
    return f"{text} {escape(f'[default: {shown}]')}"


def with_default(text: str, name: str, unset: str | None = None, objective: str = "dpo") -> str:
    """``text`` and the default of option ``name`` (``config_default``), as a help text."""
    return help_with_default(text, config_default(name, unset, objective))


@dataclass(frozen=True)
class TrainingOption:
    """One option of the training commands.

    ``help`` is one text, or a text per command where the commands mean different things by
    it. ``unset`` is the default ``--help`` shows where RunConfig leaves the field None (or
    for an option that is no RunConfig field); RunConfig fields show their default anyway.
    ``flags`` are Typer's declarations; switches (``Optional[bool]``) get ``--x/--no-x``."""

    name: str
    type: Any
    help: str | Mapping[str, str]
    panel: str | None = None
    commands: tuple[str, ...] = (RUN, SFT)
    flags: tuple[str, ...] = ()
    unset: str | None = None
    default: Any = None

    @property
    def is_field(self) -> bool:
        """Whether the option sets the RunConfig field of its name."""
        return self.name in RunConfig.model_fields

    def help_for(self, command: str) -> str:
        text = self.help if isinstance(self.help, str) else self.help[command]
        if self.is_field:
            return with_default(text, self.name, self.unset, OBJECTIVE_OF[command])
        return help_with_default(text, self.unset) if self.unset is not None else text

    def declarations(self) -> tuple[str, ...]:
        if self.flags or self.type != Optional[bool]:
            return self.flags
        flag = self.name.replace("_", "-")
        return (f"--{flag}/--no-{flag}",)

    def parameter(self, command: str) -> inspect.Parameter:
        """The callback's parameter for this option in ``command``, as Typer reads it."""
        option = typer.Option(*self.declarations(), help=self.help_for(command),
                              rich_help_panel=self.panel)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY,
                                 annotation=Annotated[self.type, option], default=self.default)


_PROGRESS = ("a live bar on a terminal; elsewhere (a log) a plain line at most every 30 s "
             "(DPO_PROGRESS_INTERVAL sets the seconds).")
_DATA = ("JSONL or JSONL.gz, a datasets name, or 'demo' (the built-in demo task, with its own "
         "held-out split and preset hyperparameters).")

# In the order of `--help`, panel by panel.
TRAINING_OPTIONS: tuple[TrainingOption, ...] = (
    TrainingOption("model", Optional[str], "The model to train: SmolLM2-135M-Instruct, a .gguf file, a local Hugging Face model directory, a hub id, or 'tiny'."),
    TrainingOption("ref_model", Optional[str], "Reference model (same kinds as --model).", commands=(RUN,), unset="a frozen copy of --model"),
    TrainingOption("ref_update_steps", Optional[int], "TR-DPO (Gorbatovski et al. 2024): every N optimizer steps, move the reference model toward the policy, for any loss with a reference (dpo, ipo, ...); 0: a frozen reference. The reference stays in memory (no precomputed log-probs). TRL calls it ref_model_sync_steps (default 512 there).", commands=(RUN,)),
    TrainingOption("ref_update_alpha", Optional[float], "TR-DPO: each update sets reference = alpha * policy + (1 - alpha) * reference, weight by weight; 1: a copy of the policy (the hard update). TRL calls it ref_model_mixup_alpha (default 0.6 there).", commands=(RUN,)),
    TrainingOption("trust_remote_code", Optional[bool], {RUN: "Run the modelling code that --model (and --ref-model) ships in its directory or hub repository (e.g. BTLM's): Python from there runs here, so only for a model you trust.",
                                                         SFT: "Run the modelling code that --model ships in its directory or hub repository (e.g. BTLM's): Python from there runs here, so only for a model you trust."}),
    TrainingOption("precompute_ref", Optional[bool], "Score every pair with the reference once before training and keep the log-probs on disk (then the reference is not in memory while training); off: a frozen reference model scores each batch.", commands=(RUN,)),
    TrainingOption("ref_logps", Optional[str], "File of precomputed reference log-probs (see `dpo precompute-ref`).", commands=(RUN,), unset="the cache directory, one file per reference model"),
    TrainingOption("data", Optional[str], {RUN: f"Training pairs: {_DATA}",
                                           SFT: f"Training records (prompt/completion, chat messages, or preference pairs: their chosen side): {_DATA}"}, DATA),
    TrainingOption("format", Optional[str], "Data format (see `dpo plugins`).", DATA, unset="auto-detected"),
    TrainingOption("eval_data", Optional[str], {RUN: "Held-out pairs for evaluation.", SFT: "Held-out records for evaluation."}, DATA, unset="none"),
    TrainingOption("eval_fraction", Optional[float], "Hold out this share of --data instead.", DATA),
    TrainingOption("max_length", Optional[int], "Prompt + completion tokens, at most.", DATA),
    TrainingOption("max_prompt_length", Optional[int], "Prompt tokens kept (the last ones).", DATA),
    TrainingOption("strict", Optional[bool], "Refuse unusable records (empty or identical completions, over-long prompts, ...) with file:line instead of dropping and counting them.", DATA),
    TrainingOption("backend", Optional[str], "cpu, cuda, rocm, xpu, xla or auto (see `dpo backends`)."),
    TrainingOption("nproc", Optional[int], "Launch N processes with torchrun (one per accelerator device; CPU processes share the host).", SCALE, unset="this process alone"),
    TrainingOption("strategy", Optional[str], {RUN: "With several processes: ddp (a replica per process) or fsdp (FSDP2: policy and reference sharded).",
                                               SFT: "With several processes: ddp (a replica per process) or fsdp (FSDP2: the model sharded)."}, SCALE),
    TrainingOption("dtype", Optional[str], "auto, float32, bfloat16 or float16."),
    TrainingOption("loss", Optional[list[str]], "Preference loss (see `dpo plugins`); repeat it to train on a weighted sum, e.g. --loss dpo --loss ipo -o weights=1.0,0.2 (plain -o keys go to every loss that takes them, dpo.beta=... to one).", commands=(RUN,)),
    TrainingOption("option", Optional[list[str]], {RUN: "Plugin option key=value; plain keys go to the loss, plugin.key=value to another plugin (e.g. -o beta=0.1).",
                                                   SFT: "Plugin option plugin.key=value, for a stopping policy or a data format (e.g. -o nan-guard.check_grad_norm=false)."},
                   flags=("--option", "-o")),
    TrainingOption("stop", Optional[list[str]], "Stopping policy, repeatable."),
    TrainingOption("lora", Optional[bool], escape("Train a LoRA adapter instead of every weight (-o lora.r=16, lora.alpha (default 2r), lora.dropout=0, lora.targets=all-linear); for DPO the reference is the base model with the adapter disabled. Needs `pip install 'dpo-trainer[lora]'`."), ADAPTER),
    TrainingOption("merge", Optional[bool], "With --lora: also write the adapter merged into the base model, a plain transformers model, to OUTPUT/merged at the end (or later: `dpo merge OUTPUT`).", ADAPTER),
    TrainingOption("max_steps", Optional[int], "Optimizer steps (0: --epochs decide).", OPTIM),
    TrainingOption("epochs", Optional[float], "Passes over the data.", OPTIM),
    TrainingOption("batch_size", Optional[int], {RUN: "Pairs per micro-batch.", SFT: "Examples per micro-batch."}, OPTIM),
    TrainingOption("grad_accum", Optional[int], "Micro-batches per optimizer step.", OPTIM),
    TrainingOption("lr", Optional[float], "Peak learning rate (AdamW).", OPTIM),
    TrainingOption("weight_decay", Optional[float], "AdamW weight decay.", OPTIM),
    TrainingOption("warmup_steps", Optional[int], "Linear warmup steps (0: --warmup-ratio).", OPTIM),
    TrainingOption("warmup_ratio", Optional[float], "Warmup share of all steps.", OPTIM),
    TrainingOption("scheduler", Optional[str], "linear, cosine or constant decay.", OPTIM),
    TrainingOption("max_grad_norm", Optional[float], "Gradient clipping norm (0: off).", OPTIM),
    TrainingOption("seed", Optional[int], "Random seed.", OPTIM),
    TrainingOption("shuffle", Optional[bool], {RUN: "A new order of the pairs every epoch (off: file order).",
                                               SFT: "A new order of the records every epoch (off: file order)."}, OPTIM),
    TrainingOption("group_by_length", Optional[bool], {RUN: "Batches of pairs of similar length: less padding.",
                                                       SFT: "Batches of records of similar length: less padding."}, OPTIM),
    TrainingOption("gradient_checkpointing", Optional[bool], "Recompute each decoder layer's activations in backward: less memory, about a third more compute.", SPEED),
    TrainingOption("share_prompt", Optional[bool], "Run each pair's prompt once for both completions, with no padding (a forward per pair instead of one per batch).", SPEED, commands=(RUN,), unset="on where the backend gains from it (CPU)"),
    TrainingOption("compile", Optional[bool], "torch.compile the decoder layers (the first steps of each new shape compile).", SPEED),
    TrainingOption("output", Optional[str], "Run directory.", OUT),
    TrainingOption("eval_steps", Optional[int], "Evaluate every N steps (0: at the end).", OUT),
    TrainingOption("eval_at_start", Optional[bool], "Evaluate once before training: the baseline.", OUT),
    TrainingOption("save_steps", Optional[int], "Checkpoint every N steps (0: at the end).", OUT),
    TrainingOption("save_total_limit", Optional[int], "Checkpoints kept.", OUT),
    TrainingOption("keep_checkpoints", Optional[bool], "Keep the checkpoints once the run is complete, so that --resume with more --max-steps can extend it (off: only final/ remains).", OUT),
    TrainingOption("progress", Optional[bool], {RUN: f"Progress of the reference pass and of training: {_PROGRESS}", SFT: f"Progress of training: {_PROGRESS}"}, OUT),
    TrainingOption("log_to", Optional[list[str]], escape("Where metrics also go, comma-separated or repeated: tensorboard (OUTPUT/tensorboard), wandb, mlflow (MLFLOW_TRACKING_URI, else OUTPUT/mlruns), or another installed logger (see `dpo plugins`); metrics.jsonl is always written. Each needs its extra: `pip install 'dpo-trainer[tensorboard]'` (or [wandb], [mlflow])."), OUT),
    TrainingOption("sample_prompts", Optional[int], "After each evaluation (the baseline and the last included), the policy's completions of the first N held-out prompts, appended to OUTPUT/samples.jsonl with their chosen and rejected answers (0: none).", OUT),
    TrainingOption("sample_max_new_tokens", Optional[int], "Tokens generated per sample, at most (fewer where the end-of-sequence token comes first).", OUT),
    TrainingOption("sample_temperature", Optional[float], "Sampling temperature of the samples (0: greedy); sampled ones are seeded by --seed, the same at every evaluation.", OUT),
    TrainingOption("eval_tasks", Optional[str], "Downstream benchmarks scored during training with EleutherAI's lm-eval harness, comma-separated: task or group names (hellaswag,arc_easy), directories of the harness's task YAML files, or YAML files; scores go to metrics.jsonl as eval/tasks/<task>/<metric> (one process only). Needs `pip install " + escape("'dpo-trainer[eval]'`."), BENCH, unset="none"),
    TrainingOption("eval_tasks_steps", Optional[int], "Score --eval-tasks every N steps (0: before training, with --eval-at-start, and at the end only).", BENCH),
    TrainingOption("eval_tasks_limit", Optional[int], "Score only the first N examples of each --eval-tasks task (a quick look).", BENCH, unset="every example"),
    TrainingOption("config", Optional[Path], "TOML file with any of these options; flags win.", flags=("--config",)),
    TrainingOption("resume", Optional[Path], "Continue the run in this directory from its newest checkpoint.", OUT),
    TrainingOption("overwrite", bool, "Replace an existing run directory.", OUT, default=False),
)


def options_of(command: str) -> list[TrainingOption]:
    """The rows of ``TRAINING_OPTIONS`` that ``command`` takes, in the table's order."""
    return [option for option in TRAINING_OPTIONS if command in option.commands]


def fields_not_taken_by(command: str) -> list[str]:
    """The RunConfig fields that some training command takes and ``command`` does not: for
    ``sft``, those that only mean something for preference training."""
    return [option.name for option in TRAINING_OPTIONS
            if option.is_field and command not in option.commands]


def callback_for(command: str, body: Callable[[typer.Context, dict[str, Any]], None],
                 doc: str) -> Callable[..., None]:
    """A Typer callback for ``command``: its signature is ``ctx`` and one keyword parameter per
    option of ``options_of(command)``; called, it passes the options' values to ``body``."""

    def callback(ctx: typer.Context, **values: Any) -> None:
        body(ctx, values)

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=typer.Context)
    parameters = [context, *(option.parameter(command) for option in options_of(command))]
    callback.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    callback.__annotations__ = {p.name: p.annotation for p in parameters}
    callback.__name__ = callback.__qualname__ = f"{command}_command"
    callback.__doc__ = doc
    return callback
