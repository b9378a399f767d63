"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), built
on the ``peft`` package: the ``lora`` extra, ``pip install 'dpo-trainer[lora]'``.

``--lora`` injects the adapter into the model in place (``peft.inject_adapter_in_model``): the
model stays the transformers class it was (so the speed paths, their verification and the
trainer's wrapping see the same model), its targeted linear layers become LoRA layers, and only
the adapter's matrices train; the base weights are frozen. An adapter starts at zero (B = 0),
so before the first update the policy computes exactly what the base model does.

**The DPO reference is the base model with the adapter disabled** (``adapter_disabled``): no
second copy of the model. Reference log-probs computed once before training are keyed by the
base weights (``base_state_dict``), so a file scored for full fine-tuning of the same model
serves a LoRA run, and the reverse.

On disk an adapter is PEFT's own format (``adapter_config.json``, ``adapter_model.safetensors``,
which ``peft.PeftModel.from_pretrained(base, directory)`` loads), plus ``dpo_adapter.json``: the
base model as dpo-trainer names it, so that ``--model DIR``, ``dpo eval`` and ``dpo merge``
find the base again. ``merge`` folds the adapter into the base weights: a plain transformers
model that loads without ``peft``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dpo.core.interfaces.errors import UsageError

EXTRA = "dpo-trainer[lora]"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_RECORD = "dpo_adapter.json"
OPTIONS_KEY = "lora"  # -o lora.r=16 and [options.lora] in a config file
_PREFIX = "base_model.model."  # what PEFT's files put before the model's own names
_NAME = "default"  # the adapter's name inside the model (PEFT's default)
_BASE = "_dpo_lora_base"  # model attribute: the record written to dpo_adapter.json


class LoraOptions(BaseModel):
    """``-o lora.KEY=VALUE``: the adapter's shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(16, gt=0, description="rank of the update matrices")
    alpha: float | None = Field(None, gt=0, description="scaling: the update is multiplied "
                                "by alpha / r; default: twice r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input while "
                           "training (the rest of the model's dropout is off)")
    targets: str = Field("all-linear", description="modules that take an adapter: 'all-linear' "
                         "(every linear layer of the decoder), or comma-separated module names "
                         "(e.g. q_proj,v_proj)")

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names:
            raise ValueError("name at least one module, or 'all-linear'")
        return ",".join(names)

    def target_modules(self) -> str | list[str]:
        return "all-linear" if self.targets == "all-linear" else self.targets.split(",")


def parse_options(values: dict[str, Any]) -> LoraOptions:
    """``-o lora.*`` values (strings or TOML values) as ``LoraOptions``, or one line."""
    fields = LoraOptions.model_fields
    for key in values:
        if key not in fields:
            raise UsageError(f"--lora: unknown option lora.{key} (valid: "
                             f"{', '.join(f'lora.{k}' for k in fields)})")
    try:
        return LoraOptions.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"--lora: option lora.{key}={values.get(err['loc'][0])}: "
                         f"{err['msg'].removeprefix('Value error, ')}") from None


def require_peft() -> Any:
    """The ``peft`` module, or one line naming the extra to install."""
    try:
        import peft
    except ImportError:
        raise UsageError(f"--lora needs the peft package: pip install '{EXTRA}'") from None
    return peft


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def is_adapted(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries a LoRA adapter that dpo-trainer injected."""
    return getattr(model, _BASE, None) is not None


def add_adapter(model: torch.nn.Module, options: LoraOptions, base: dict[str, Any]) -> int:
    """Inject a fresh adapter into ``model`` (in place) and freeze everything else; ``base``
    names the base model (``dpo_adapter.json``). Returns the number of trainable parameters."""
    peft = require_peft()
    alpha = options.alpha if options.alpha is not None else 2 * options.r
    config = peft.LoraConfig(r=options.r, lora_alpha=alpha,
                             lora_dropout=options.dropout,
                             target_modules=options.target_modules(), task_type="CAUSAL_LM")
    _inject(model, config, base)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _inject(model: torch.nn.Module, config: Any, base: dict[str, Any]) -> None:
    from peft import inject_adapter_in_model

    try:
        with warnings.catch_warnings():  # on targets refused below (an embedding), peft warns
            warnings.simplefilter("ignore")
            inject_adapter_in_model(config, model, adapter_name=_NAME)
    except ValueError as exc:  # e.g. a target name that matches no module
        raise UsageError(f"--lora: {str(exc).splitlines()[0].rstrip('. ')}; set -o lora.targets to module "
                         "names of this model, or 'all-linear'") from None
    layers = _tuner_layers(model)
    embeddings = {id(model.get_input_embeddings())}
    if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None:
        embeddings.add(id(model.get_output_embeddings()))
    if any(id(layer) in embeddings or id(getattr(layer, "base_layer", None)) in embeddings
           for layer in layers):
        raise UsageError("--lora: lora.targets names an embedding or the output layer, which "
                         "read their weights directly (chunked output projection); target "
                         "the decoder's linear layers")
    if not layers or not all(hasattr(layer, "_disable_adapters") for layer in layers):
        raise UsageError("--lora: this peft release injects adapters dpo-trainer cannot switch "
                         f"off for the reference; install a supported one: pip install '{EXTRA}'")
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    config.base_model_name_or_path = base.get("location")
    object.__setattr__(model, _BASE, base)  # a plain attribute: not in the state dict


def describe(model: torch.nn.Module) -> dict[str, Any]:
    """The adapter's settings and size, for the run's record and log."""
    config = model.peft_config[_NAME]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n)
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "modules": len(_tuner_layers(model)),
            "targets": sorted({name.rsplit(".", 1)[-1] for name in config.target_modules}),
            "trainable_parameters": trainable, "base_parameters": total}


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """``model`` computes the base model's output for a while (DPO's reference). Flips each
    LoRA layer's switch only: PEFT's own ``enable_adapters`` also changes ``requires_grad``,
    which a DDP- or FSDP-wrapped model must keep as it was when wrapped."""
    layers = _tuner_layers(model) if is_adapted(model) else []
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights as the model had them before the adapter went in: adapter
    tensors left out, each LoRA layer's ``base_layer`` under its original name."""
    state = model.state_dict()
    if not is_adapted(model):
        return state
    return {name.replace(".base_layer.", "."): tensor for name, tensor in state.items()
            if ".lora_" not in name}


def set_dropout(model: torch.nn.Module) -> None:
    """The adapter's own dropout, as configured (``disable_dropout`` zeroes every dropout)."""
    if not is_adapted(model):
        return
    p = model.peft_config[_NAME].lora_dropout
    for layer in _tuner_layers(model):
        for dropout in getattr(layer, "lora_dropout", {}).values():
            if isinstance(dropout, torch.nn.Dropout):
                dropout.p = p


# -- files -------------------------------------------------------------------------------------

def file_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names PEFT's files use (from ``state_dict``, the model's
    full one, when given: e.g. gathered from FSDP shards), on the host."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: no adapter targets an embedding (``_inject`` refuses it),
    # and "auto" would look the base model's config up on the hub.
    adapter = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=_NAME,
                                        save_embedding_layers=False)
    return {_PREFIX + name: t.detach().to("cpu").contiguous() for name, t in adapter.items()}


def model_state(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT file names -> the model's own parameter names (the adapter's name put back); a
    tensor that is no adapter parameter of ``model`` is refused."""
    own = dict(model.named_parameters())
    out = {}
    for name, tensor in saved.items():
        short = name.removeprefix(_PREFIX)
        head, _, leaf = short.rpartition(".")
        full = f"{head}.{_NAME}.{leaf}"
        if full not in own or ".lora_" not in full:
            raise UsageError(f"adapter tensor {name!r} matches no adapter parameter of this "
                             "model: the adapter was made for another model or other targets")
        out[full] = tensor
    return out


def write_adapter(directory: Path, model: torch.nn.Module,
                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter of ``model`` in PEFT's format, plus ``dpo_adapter.json``."""
    from safetensors.torch import save_file

    config = model.peft_config[_NAME]
    config.save_pretrained(str(directory))
    save_file(file_state(model, state_dict), str(directory / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (directory / ADAPTER_RECORD).write_text(json.dumps(getattr(model, _BASE), indent=2,
                                                       sort_keys=True) + "\n")


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def read_record(directory: Path) -> dict[str, Any]:
    """``dpo_adapter.json`` of an adapter directory, or, for an adapter written by PEFT itself,
    its ``base_model_name_or_path``."""
    try:
        if (directory / ADAPTER_RECORD).is_file():
            record = json.loads((directory / ADAPTER_RECORD).read_text())
        else:
            config = json.loads((directory / ADAPTER_CONFIG).read_text())
            record = {"model": config.get("base_model_name_or_path")}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{directory}: unreadable adapter files ({exc})") from None
    if not isinstance(record, dict) or not record.get("model"):
        raise UsageError(f"{directory}: the adapter does not name its base model "
                         f"({ADAPTER_RECORD} or base_model_name_or_path in {ADAPTER_CONFIG})")
    return record


def load_adapter(directory: Path, model: torch.nn.Module, base: dict[str, Any]) -> None:
    """Inject the adapter saved in ``directory`` into ``model`` (its base), with its weights."""
    peft = require_peft()
    from safetensors.torch import load_file

    try:
        config = peft.LoraConfig.from_pretrained(str(directory))
        saved = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"{directory}: cannot read the adapter ({str(exc).splitlines()[0]})"
                         ) from None
    _inject(model, config, base)
    load_weights(model, saved)


def load_weights(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors (PEFT's file names) into an adapted model."""
    state = model_state(model, saved)
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise UsageError(f"the adapter lacks {sorted(missing)[0]}: it was made with other "
                         "targets")
    with torch.no_grad():
        own = dict(model.named_parameters())
        for name, tensor in state.items():
            own[name].copy_(tensor)


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapter into the base weights (W + B A alpha/r) and put the plain layers back:
    the model the adapter trained, without ``peft``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer):
            continue
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    for attribute in ("peft_config", "_hf_peft_config_loaded", _BASE):
        if attribute in vars(model):
            object.__delattr__(model, attribute)
    model.requires_grad_(True)
    return model
