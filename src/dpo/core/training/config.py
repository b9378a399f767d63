"""RunConfig: every option of ``dpo run``, resolved as defaults < ``--config`` file < flags."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from dpo.core.interfaces.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DTYPES = ("auto", "float32", "bfloat16", "float16")


FLOAT32_MAX = 3.4028234663852886e38

# Defaults that depend on the objective, over RunConfig's own (which are DPO's): supervised
# fine-tuning takes a learning rate well above DPO's, and writes its run beside a DPO run's.
OBJECTIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpo": {},
    "sft": {"objective": "sft", "lr": 2e-5, "output": "out-sft"},
}


class RunConfig(BaseModel):
    """The resolved configuration of one training run (recorded in ``run.json``)."""

    model_config = ConfigDict(extra="forbid")

    # what to train on
    model: str = Field("SmolLM2-135M-Instruct", description="the default model, a .gguf file, a local "
                       "Hugging Face directory, a hub id, or 'tiny'")
    ref_model: str | None = Field(None, description="reference model; default: a frozen copy of --model")
    # TR-DPO (dpo.core.training.refupdate); before precompute_ref, whose validator reads it
    ref_update_steps: int = Field(0, ge=0, description="TR-DPO: every N optimizer steps the "
                                  "reference model moves toward the policy; 0: a frozen reference")
    ref_update_alpha: float = Field(1.0, gt=0, le=1, description="TR-DPO: the policy's weight in "
                                    "each reference update (1: a copy, the hard update)")
    trust_remote_code: bool = Field(False, description="run the modelling code a model directory "
                                    "or hub repository ships (e.g. BTLM); off by default")
    precompute_ref: bool = Field(True, description="score every pair with the reference once "
                                 "before training (kept on disk), not in every step")
    ref_logps: str | None = Field(None, description="file of precomputed reference log-probs; "
                                  "default: the cache directory, one file per reference model")
    data: str = Field("demo", description="training pairs (JSONL or JSONL.gz), a datasets name, or "
                      "'demo' (the built-in demo dataset)")
    format: str | None = Field(None, description="data format; auto-detected when unset")
    eval_data: str | None = Field(None, description="held-out pairs for evaluation")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="hold out this share of --data")
    max_length: int = Field(512, gt=1, description="prompt + completion tokens, at most")
    max_prompt_length: int = Field(256, gt=0, description="prompt tokens kept (the last ones)")
    strict: bool = Field(False, description="refuse unusable records instead of dropping them")

    # where to run it
    backend: str = Field("auto", description="cpu, cuda, rocm, xpu, xla, or auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="how several processes share "
                                             "the model: ddp (replicas) or fsdp (FSDP2 shards)")

    # the objective
    objective: Literal["dpo", "sft"] = Field("dpo", description="what the run trains: dpo "
                                             "(`dpo run`: preference pairs, a loss plugin) or "
                                             "sft (`dpo sft`: the completions' token-mean NLL)")
    loss: str = Field("dpo", description="the preference loss; several trained together are "
                      "their names joined by '+' (dpo+sft), from a repeated --loss or a list")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-plugin options, keyed by plugin name"
    )
    stop: list[str] = Field(default_factory=lambda: ["nan-guard"])

    # what trains
    lora: bool = Field(False, description="train a LoRA adapter (-o lora.r=..., lora.alpha, "
                       "lora.dropout, lora.targets) instead of every weight; the reference is "
                       "the base model with the adapter disabled (needs dpo-trainer[lora])")
    merge: bool = Field(False, description="with --lora, also write the adapter merged into "
                        "the base model (OUTPUT/merged: a plain transformers model) at the end")

    # the optimisation
    max_steps: int = Field(0, ge=0, description="optimizer steps; 0 means --epochs decide")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, gt=0, description="pairs per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="used when --warmup-steps is 0")
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    seed: int = Field(42, ge=0, lt=2**63, description="random seed (torch takes 64 bits)")
    shuffle: bool = Field(True, description="a new order of the pairs every epoch")
    group_by_length: bool = Field(True, description="batches of pairs of similar length")

    # speed and memory
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer's "
                                         "activations in backward: less memory, about 1/3 more compute")
    compile: bool = Field(False, description="torch.compile the model's decoder layers")
    share_prompt: bool | None = Field(None, description="run each pair's prompt once for both "
                                      "completions, with no padding; default: where the "
                                      "backend gains from it (CPU)")

    # output
    output: str = "out"
    eval_steps: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    eval_at_start: bool = Field(True, description="evaluate once before training (the baseline)")
    save_steps: int = Field(100, ge=0, description="checkpoint every N steps (0: only at the end)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept")
    keep_checkpoints: bool = Field(True, description="keep the checkpoints once the run is "
                                   "complete, so that --resume with more --max-steps can extend "
                                   "it (off: only final/ remains)")
    progress: bool = True
    log_to: list[str] = Field(default_factory=lambda: ["jsonl"], description="where metrics go "
                              "besides metrics.jsonl (always written): tensorboard, wandb, "
                              "mlflow or another installed logger")

    @field_validator("loss", mode="before")
    @classmethod
    def _join_losses(cls, value: Any) -> Any:
        return joined_loss(value)

    @field_validator("log_to", mode="before")
    @classmethod
    def _split_log_to(cls, value: Any) -> Any:
        # "tensorboard,wandb" (a flag's value, or a string in a config file) is a list too.
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(v, str) for v in items):
            return list(dict.fromkeys(n.strip() for v in items for n in v.split(",") if n.strip()))
        return value

    # generations to read
    sample_prompts: int = Field(0, ge=0, description="after each evaluation, the policy's "
                                "completions of the first N held-out prompts, into "
                                "samples.jsonl; 0: none")
    sample_max_new_tokens: int = Field(64, gt=0, description="tokens generated per sample, at "
                                       "most (fewer where the end-of-sequence token comes)")
    sample_temperature: float = Field(0.0, ge=0, description="0: greedy; above: sampled at this "
                                      "temperature, seeded by --seed")

    # downstream benchmarks during training (the lm-eval harness, dpo-trainer[eval])
    eval_tasks: str | None = Field(None, description="lm-eval harness tasks scored during "
                                   "training, comma-separated: task or group names, directories "
                                   "of task YAML files, or YAML files")
    eval_tasks_steps: int = Field(0, ge=0, description="score --eval-tasks every N steps (0: "
                                  "before training and at the end only)")
    eval_tasks_limit: int | None = Field(None, ge=1, description="the first N examples of each "
                                         "task only")

    @field_validator("lr")
    @classmethod
    def _float32_lr(cls, value: float) -> float:
        # Optimizer kernels (e.g. Intel's fused AdamW) take the learning rate as a float32.
        if not value <= FLOAT32_MAX:
            raise ValueError(f"must be at most {FLOAT32_MAX:.4g} (float32's largest value)")
        return value

    @field_validator("precompute_ref")
    @classmethod
    def _nothing_precomputed_to_update(cls, value: bool, info: ValidationInfo) -> bool:
        # Runs only for a value given (a flag, a config file, a resumed run's record); where
        # precompute_ref is left to its default, _check turns it off for TR-DPO instead.
        if value and info.data.get("ref_update_steps"):
            raise ValueError("TR-DPO (--ref-update-steps) updates the reference model during "
                             "training, so its log-probs cannot be computed before it; drop "
                             "precompute_ref (or give --no-precompute-ref)")
        return value

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                f"({self.max_length}) to leave room for the completion"
            )
        if self.eval_data and self.eval_fraction:
            raise ValueError("give either eval_data or eval_fraction, not both")
        for name in ("eval_tasks_steps", "eval_tasks_limit"):
            if getattr(self, name) and not self.eval_tasks:
                raise ValueError(f"--{name.replace('_', '-')} sets how --eval-tasks runs: "
                                 "give --eval-tasks too (eval_tasks in a config file)")
        if self.ref_update_steps:
            if self.ref_logps:
                raise ValueError("--ref-logps reads reference log-probs computed before "
                                 "training, and --ref-update-steps (TR-DPO) changes the reference "
                                 "during it: give one of them")
            if self.lora:
                raise ValueError("--ref-update-steps with --lora: a LoRA run's reference is "
                                 "its base model (the adapter disabled), which has no weights "
                                 "of its own to update; train every weight for TR-DPO (drop "
                                 "--lora)")
            self.precompute_ref = False  # a reference to update stays in memory
        if self.merge and not self.lora:
            raise ValueError("merge writes a LoRA adapter merged into its base model: it needs "
                             "lora (--lora)")
        return self

    def plugin_options(self, name: str) -> dict[str, Any]:
        return dict(self.options.get(name, {}))

    # The values that a --config file gave (and no later layer replaced), for errors found
    # after validation (e.g. a loss combination's): ``"loss"``, or ``(plugin, key)`` of
    # ``options``, -> its FileOrigin. Set by resolve_config; not part of the record.
    _file_origins: dict[Any, FileOrigin] = PrivateAttr(default_factory=dict)

    @property
    def file_origins(self) -> dict[Any, FileOrigin]:
        return self._file_origins


class FileOrigin(NamedTuple):
    """Where a config file gave a value: ``FILE:LINE``, the key as the file writes it
    (``loss``, ``[options] beta``, ``[options.ipo] beta``) and the value."""

    where: str
    key: str
    value: Any

    def error(self, message: str) -> str:
        """The one-line error for a bad value here: ``FILE:LINE: key = value: message``."""
        return (f"{self.where}: {self.key} = {json.dumps(self.value, default=str)}: {message}; "
                "fix it in the config file")


def joined_loss(value: Any) -> Any:
    """Losses trained together as one string: a repeated ``--loss`` or a config file's
    ``loss = ["dpo", "sft"]`` is ``"dpo+sft"`` (``dpo.core.training.combination``); a string,
    or a one-item list, stays one name. One string keeps records, sweeps and ``dpo eval``
    reading a run's loss as they did."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value) and value:
        return "+".join(v.strip() for v in value)
    return value


def _normalise_keys(table: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_") if k != "options" else k: v for k, v in table.items()}


class ConfigFile(dict):
    """The table of a ``--config`` file, keeping its path and each key's line so that a bad
    value is reported where the user can fix it."""

    def __init__(self, table: dict[str, Any], path: Path, lines: dict[str, int]):
        super().__init__(table)
        self.path, self.lines = path, lines

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.path}:{line}" if line else str(self.path)


def _key_lines(text: str) -> dict[str, int]:
    """The line of each top-level key (``key = ...`` before the first table, or ``[key...]``)."""
    lines: dict[str, int] = {}
    in_table = False
    for number, line in enumerate(text.splitlines(), start=1):
        if match := re.match(r"\s*\[+\s*\"?([\w-]+)", line):
            in_table = True
        elif not in_table:
            match = re.match(r"\s*\"?([\w-]+)\"?\s*[=.]", line)
        if match:
            lines.setdefault(match[1].replace("-", "_"), number)
    return lines


def _option_lines(text: str) -> dict[str, int]:
    """The line of each key under ``options``, keyed ``options.KEY`` (``[options]`` and its
    plain ``KEY = ...``) or ``options.PLUGIN.KEY`` (``[options.PLUGIN]``'s keys, and dotted
    ``PLUGIN.KEY = ...`` under ``[options]``)."""
    lines: dict[str, int] = {}
    table: str | None = None  # the dotted name of the current table, quotes dropped
    for number, line in enumerate(text.splitlines(), start=1):
        if header := re.match(r"\s*\[\s*([^\[\]#]+?)\s*\]", line):
            table = ".".join(p.strip().strip("\"'") for p in header[1].split("."))
            if table.startswith("options"):
                lines.setdefault(table, number)
        elif table is not None and (table == "options" or table.startswith("options.")):
            if key := re.match(r"\s*((?:\s*(?:\"[^\"]*\"|'[^']*'|[\w-]+)\s*\.?)+?)\s*=", line):
                dotted = ".".join(p.strip().strip("\"'") for p in key[1].split("."))
                lines.setdefault(f"{table}.{dotted}", number)
    return lines


def read_config_file(path: str | Path) -> ConfigFile:
    """Read a TOML config file: top-level keys are ``run`` options (``max_steps`` or
    ``max-steps``); an ``[options]`` table holds loss options, and ``[options.<plugin>]``
    sub-tables hold any other plugin's options."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # Notepad starts UTF-8 with a BOM
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found; check the path given to "
                         "--config") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory; --config takes a TOML file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the config file ({exc.strerror or exc}); check "
                         "that it is a readable file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text, so not a TOML file; save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        reason, where = str(exc).replace(" (at end of document)", " at the end of the file"), path
        if found := re.search(r" \(at line (\d+), column (\d+)\)$", reason):
            reason, where = f"{reason[:found.start()]}, column {found[2]}", f"{path}:{found[1]}"
        raise UsageError(f"{where}: not valid TOML ({reason}); fix the syntax, see "
                         "https://toml.io") from None
    raw = _normalise_keys(raw)
    table = ConfigFile(raw, path, {**_key_lines(text), **_option_lines(text)})
    unknown = sorted(set(raw) - set(RunConfig.model_fields))
    if unknown:
        raise UsageError(f"{table.where(unknown[0])}: unknown key {unknown[0]!r}; valid keys: "
                         f"{', '.join(sorted(RunConfig.model_fields))}")
    if not isinstance(raw.get("options", {}), dict):
        raise UsageError(f"{table.where('options')}: options must be a table: an [options] "
                         "section of key = value lines, or [options.<plugin>] sections")
    return table


def split_options(flat: dict[str, Any], loss: str) -> dict[str, dict[str, Any]]:
    """``{"beta": 0.2, "nan-guard.check_grad_norm": False, "dpo": {...}}`` ->
    ``{"dpo": {"beta": 0.2}, "nan-guard": {"check_grad_norm": False}}``.

    Unqualified keys belong to the loss; ``plugin.key`` keys and sub-tables to that plugin."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if isinstance(value, dict):
            out.setdefault(key, {}).update(value)
            continue
        plugin, dot, option = key.rpartition(".")
        out.setdefault(plugin if dot else loss, {})[option] = value
    return out


def demo_preset(objective: str = "dpo") -> dict[str, Any]:
    """The demo's preset hyperparameters for a run of ``objective``: ``DEMO_PRESET`` for DPO,
    ``SFT_DEMO_PRESET`` for supervised fine-tuning."""
    from dpo.core.training.demo import DEMO_PRESET, SFT_DEMO_PRESET

    return SFT_DEMO_PRESET if objective == "sft" else DEMO_PRESET


def with_preset(layers: list[dict[str, Any]], objective: str = "dpo") -> list[dict[str, Any]]:
    """``layers`` behind the defaults of ``objective`` (``OBJECTIVE_DEFAULTS``) and, when the run
    trains on the demo dataset, the demo's preset for that objective: each fills what the
    layers above it leave unset (the order: objective defaults < demo preset < ``layers``)."""
    below = [OBJECTIVE_DEFAULTS[objective]]
    data = RunConfig.model_fields["data"].default
    for layer in [*below, *layers]:
        if layer.get("data") is not None:
            data = layer["data"]
    if data == "demo":
        below.append(demo_preset(objective))
    return [*below, *layers]


def resolve_config(*layers: dict[str, Any]) -> RunConfig:
    """Merge layers (later wins) into a validated RunConfig; ``options`` merge per plugin."""
    merged: dict[str, Any] = {}
    origin: dict[str, dict[str, Any]] = {}  # key -> the layer its value came from
    raw_options: list[dict[str, Any]] = []
    for layer in layers:
        for key, value in layer.items():
            if key == "options":
                raw_options.append(value)
            elif value is not None:
                merged[key], origin[key] = value, layer
    loss = joined_loss(merged.get("loss", RunConfig.model_fields["loss"].default))
    options: dict[str, dict[str, Any]] = {}
    for layer_options in raw_options:
        for plugin, values in split_options(layer_options, loss).items():
            options.setdefault(plugin, {}).update(values)
    merged["options"] = options
    try:
        config = RunConfig.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:
            raise UsageError(message) from None
        key = ".".join(str(p) for p in err["loc"]).replace("_", "-")
        given = merged.get(err["loc"][0])
        layer = origin.get(str(err["loc"][0]))
        if isinstance(layer, ConfigFile):
            raise UsageError(f"{layer.where(str(err['loc'][0]))}: {key} = "
                             f"{json.dumps(given, default=str)}: {message}; fix it in the "
                             "config file") from None
        raise UsageError(f"--{key}={given}: {message}") from None
    config._file_origins.update(_file_origins(layers, origin, loss))
    return config


def _file_origins(layers: tuple[dict[str, Any], ...], origin: dict[str, dict[str, Any]],
                  loss: str) -> dict[Any, FileOrigin]:
    """Where config files gave the run's loss and its plugin options (the last layer that
    sets a value wins, as in resolve_config): see ``RunConfig.file_origins``."""
    found: dict[Any, FileOrigin] = {}
    layer = origin.get("loss")
    if isinstance(layer, ConfigFile):
        found["loss"] = FileOrigin(layer.where("loss"), "loss", layer["loss"])
    for layer in layers:
        for key, value in (layer.get("options") or {}).items():
            table = value if isinstance(value, dict) else {key: value}
            for name, item in table.items():
                plugin, dot, option = (f"{key}.{name}" if table is value else name).rpartition(".")
                slot = (plugin if dot else loss, option)
                if not isinstance(layer, ConfigFile):
                    found.pop(slot, None)  # a later layer (flags, a record) replaced it
                    continue
                line = f"options.{plugin}.{option}" if dot else f"options.{option}"
                shown = f"[options.{plugin}] {option}" if dot else f"[options] {option}"
                where = layer.where(line) if line in layer.lines else layer.where("options")
                found[slot] = FileOrigin(where, shown, item)
    return found
