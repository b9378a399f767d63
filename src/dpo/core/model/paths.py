"""Which speed paths the log-prob computation takes for a model, and why the others are off.

The **plain path** is the textbook computation: each sequence alone through the model's own
forward (no padding, no other rows beside it), full ``[T, V]`` logits, log-softmax, the
completion tokens' log-probs summed. Whatever a model does in its forward, the plain path does
too, so it is right for every model that runs on token ids.

A **speed path** computes the same function faster or in less memory, by calling parts of the
model itself. Each one needs something of the model that the plain path does not, and is used
only where that is proven:

| path | what it does | what it needs of the model |
|---|---|---|
| ``batched`` | runs a batch's rows together, right-padded, with the attention mask (what most trainers do) | a real token's output depends neither on the padding nor on the other rows |
| ``unmasked`` | runs right-padded rows without the attention mask (the kernel's causal path) | a real token's output never depends on the padding after it |
| ``chunked_head`` | runs the decoder, then the output projection on completion positions only, in chunks (``head_logps``) | the logits are exactly ``head(decoder(ids).last_hidden_state)``: nothing between the two, nothing after the head |
| ``tied_buffer`` | one float32 gradient buffer for a tied input embedding and output projection (``TiedGradient``) | the decoder given ``inputs_embeds = embedding(ids)`` computes what it computes from ``ids`` |
| ``shared_prompt`` | each pair's prompt once, both completions on its keys and values (``shared_prompt_logps``) | a plain key/value cache, and attention that places tokens by their position ids and mask, not by their index in the cache (within ``window`` of each other) |
| ``packed_rows`` | rows' real tokens in one sequence, for a variable-length attention kernel (``packed_logps``) | every attention layer keeps the rows apart by the cumulative lengths |
| ``layer_checkpointing`` | our own per-decoder-layer activation checkpointing, which keeps the key/value cache (``dpo.core.model.activations``) | decoder layers that can be found and that compute the same when replayed |

"Proven" has three layers:

1. **Verified architectures** (``dpo.core.model.verified``): for each model type of transformers,
   the paths that the architecture test (``tests/test_architectures.py``) shows equal to a
   naive computation, on tiny random models of every causal-LM architecture transformers
   ships, tied and untied, with and without a small sliding window, with and without logit
   scaling. A path is on only for a model whose class is transformers' own class for a listed
   type: an unknown architecture, remote code or a subclass gets the plain path.
2. **What the model declares**: each verified type names the config attributes that set its
   attention windows (shared-prompt groups are kept within the smallest window, where cache
   indices and positions give the same masks), and those that must keep their neutral value
   for the head to be plain (``neutral_head``) or for ``inputs_embeds`` to be what the model
   makes of ids (``neutral_embedding``).
3. **A check on real data** (``dpo.core.model.pathcheck.check``): before the first step, the paths' log-probs of one
   small batch are compared with the plain path's; a path that differs is turned off, with a
   line in the log and in ``run.json``. That catches config values no test has seen.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

SPEED_PATHS = ("batched", "unmasked", "chunked_head", "tied_buffer", "shared_prompt",
               "packed_rows", "layer_checkpointing")

# The paths that change how the log-probs are computed (the others change only what backward
# keeps or how the gradient is gathered: the same values). Reference log-probs are kept per set
# of these, so that the policy, still the reference at step 1, reproduces them bit for bit.
VALUE_PATHS = ("batched", "unmasked", "chunked_head", "shared_prompt", "packed_rows")

# What each path builds on: a path is on only with these on too.
NEEDS: dict[str, tuple[str, ...]] = {
    "unmasked": ("batched",),
    "tied_buffer": ("chunked_head",),
    "shared_prompt": ("chunked_head", "unmasked"),
    "packed_rows": ("chunked_head", "batched"),
}

# Attention implementations (names containing one of these) whose kernels take variable-length
# sequences as cumulative lengths: transformers' ``flash_attention_2``/``_3``, hub kernels such
# as ``kernels-community/flash-attn``. Code registering its own such kernel with transformers'
# ``AttentionInterface`` can add its name here.
VARLEN_ATTENTION = ["flash"]


@dataclass(frozen=True)
class Paths:
    """The speed paths one model runs on (all off: the plain path), and why the others are off.

    ``window``: the smallest attention window of the model (sliding, local or chunked
    attention), or None; shared-prompt groups then keep every token within it.
    ``static_shapes``: shapes must not depend on values (XLA): the batch's padded rows run
    together with their mask, every position scored and masked, and no other path is on.
    """

    batched: bool = False
    unmasked: bool = False
    chunked_head: bool = False
    tied_buffer: bool = False
    shared_prompt: bool = False
    packed_rows: bool = False
    layer_checkpointing: bool = False
    static_shapes: bool = False
    window: int | None = None
    off: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    inexact: frozenset[str] = frozenset()  # turned off by ``check``: found wrong on real data

    def used(self) -> list[str]:
        return [name for name in SPEED_PATHS if getattr(self, name)]

    def reasons(self) -> dict[str, str]:
        return dict(self.off)

    def values_key(self) -> list[str]:
        """The ``VALUE_PATHS`` on: what the log-probs' rounding depends on."""
        return [name for name in VALUE_PATHS if getattr(self, name)]

    def without(self, names: list[str] | tuple[str, ...], reason: str) -> Paths:
        """These paths (and those built on them) off, each with ``reason``."""
        drop = set(names)
        changed = True
        while changed:  # a path needing one that is dropped goes too
            changed = False
            for path, needs in NEEDS.items():
                if path not in drop and getattr(self, path) and drop & set(needs):
                    drop.add(path)
                    changed = True
        off = dict(self.off)
        for name in SPEED_PATHS:
            if name in drop and getattr(self, name):
                needed = ", ".join(sorted(drop & set(NEEDS.get(name, ()))))
                off[name] = reason if name in names else f"needs {needed}, off: {reason}"
        return dataclasses.replace(self, off=tuple(off.items()),
                                   **{name: False for name in drop if name in SPEED_PATHS})

    def describe(self) -> str:
        """One line for the log; on the plain path for one reason (remote code, an unverified
        architecture, a backend's static shapes), the reason too."""
        used = ", ".join(self.used()) or "none (the plain path)"
        line = f"speed paths: {used}"
        reasons = set(self.reasons().values())
        if not self.used() and len(reasons) == 1:
            line += f": {reasons.pop()}"
        if self.window is not None and self.shared_prompt:
            line += f" (shared-prompt groups within the attention window of {self.window})"
        return line

    def record(self) -> dict[str, Any]:
        """For ``run.json`` and the reference log-prob file's metadata."""
        return {"used": self.used(), "off": self.reasons(), "window": self.window,
                "static_shapes": self.static_shapes}


PLAIN = Paths()


# -- what a model is ---------------------------------------------------------------------------

def architecture(model: torch.nn.Module) -> tuple[str | None, str | None]:
    """(model type, None) when ``model`` is transformers' own causal-LM class for its config's
    model type, else (None, why not): remote code, a subclass, an unknown type."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = type(model)
    if not model_type:
        return None, f"{cls.__name__} has no Hugging Face config"
    if not cls.__module__.startswith("transformers.models."):
        return None, (f"{cls.__name__} comes from {cls.__module__.split('.')[0]}, not from "
                      "transformers (remote code or a custom class): not verified")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    expected = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if expected == cls.__name__:
        return model_type, None
    # A class built on a sub-config (Emu3ForCausalLM on "emu3_text_model"): the one type that
    # maps to the class.
    owners = [t for t, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if name == cls.__name__]
    if len(owners) == 1:
        return owners[0], None
    return None, (f"{cls.__name__} is not transformers' causal LM for model type "
                  f"{model_type!r} ({expected or 'none'}): not verified")


def _config_value(config: Any, name: str) -> Any:
    """``config.name``, looked up in the text config of a composite config too."""
    for part in (config, getattr(config, "text_config", None)):
        if part is not None and hasattr(part, name):
            return getattr(part, name)
    return None


def attention_window(config: Any, names: tuple[str, ...]) -> int | None:
    """The smallest positive window among these config attributes (ints, or lists of ints per
    layer), or None where none is set."""
    windows = []
    for name in names:
        value = _config_value(config, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        windows += [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(windows) if windows else None


def _differs(value: Any, neutral: Any) -> bool:
    numbers = (int, float)
    if (isinstance(neutral, numbers) and isinstance(value, numbers)
            and not isinstance(value, bool) and not isinstance(neutral, bool)):
        return not math.isclose(float(value), float(neutral))
    return value != neutral


def verified_paths(model: torch.nn.Module) -> Paths:
    """Every speed path this model may take, whatever the run asks (``resolve`` then applies
    the run's options and the backend)."""
    from dpo.core.model.activations import decoder_layers_of
    from dpo.core.model.verified import VERIFIED

    model_type, why = architecture(model)
    arch = VERIFIED.get(model_type) if model_type else None
    if model_type and arch is None:
        why = f"model type {model_type!r} is not among the verified architectures"
    off: dict[str, str] = {}
    on: dict[str, bool] = {}
    for name in SPEED_PATHS:
        if arch is None:
            off[name] = why or "not verified"
        elif name not in arch.paths:
            off[name] = f"not exact on {model_type} (tests/test_architectures.py)"
        else:
            on[name] = True
    window = attention_window(model.config, arch.window) if arch else None
    if arch is not None:
        config = model.config
        for name, neutral in arch.neutral_head:
            value = _config_value(config, name)
            if value is not None and _differs(value, neutral):
                for path in ("chunked_head", "tied_buffer", "shared_prompt", "packed_rows"):
                    if on.pop(path, False):
                        off[path] = (f"config {name} = {value!r} changes the logits after the "
                                     f"head (verified at {neutral!r} only)")
        for name, neutral in arch.neutral_embedding:
            value = _config_value(config, name)
            if value is not None and _differs(value, neutral) and on.pop("tied_buffer", False):
                off["tied_buffer"] = (f"config {name} = {value!r} scales embeddings made from "
                                      f"ids only (verified at {neutral!r} only)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if on.get("chunked_head") and (not isinstance(head, torch.nn.Linear) or decoder is None
                                   or decoder is model):
        on.pop("chunked_head")
        off["chunked_head"] = "no linear output projection apart from a decoder"
    if on.get("tied_buffer") and not plain_tied_embedding(model):
        on.pop("tied_buffer")
        off["tied_buffer"] = "input embedding and output projection are not one plain weight"
    if on.get("layer_checkpointing") and decoder_layers_of(model) is None:
        on.pop("layer_checkpointing")
        off["layer_checkpointing"] = "no decoder layers to find"
    if on.get("packed_rows") and not has_varlen_attention(model):
        on.pop("packed_rows")
        implementation = getattr(model.config, "_attn_implementation", None)
        off["packed_rows"] = f"attention {implementation!r} has no variable-length kernel"
    paths = Paths(window=window, off=tuple(off.items()), **on)
    missing = [name for name in SPEED_PATHS if getattr(paths, name)
               and any(not getattr(paths, need) for need in NEEDS.get(name, ()))]
    return paths.without(missing, "needs a path that is off") if missing else paths


def plain_tied_embedding(model: torch.nn.Module) -> bool:
    """Whether the input embedding is a plain ``nn.Embedding`` sharing its weight with a linear
    output projection (what ``tied_buffer`` needs)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (type(embedding) is torch.nn.Embedding and isinstance(head, torch.nn.Linear)
            and embedding.weight is head.weight and embedding.max_norm is None
            and not embedding.scale_grad_by_freq and not embedding.sparse)


def has_varlen_attention(model: torch.nn.Module) -> bool:
    implementation = str(getattr(getattr(model, "config", None), "_attn_implementation", ""))
    return any(name in implementation for name in VARLEN_ATTENTION)


def resolve(model: torch.nn.Module, *, static_shapes: bool = False,
            share_prompt: bool | None = None, share_prompt_default: bool = False,
            gradient_checkpointing: bool = False, sharded: bool = False,
            backend_name: str = "") -> Paths:
    """The paths a run takes: the model's verified ones, less what the run's options and the
    backend rule out. ``share_prompt``: the flag (None: ``share_prompt_default``, the
    backend's preference). ``sharded``: FSDP, where every rank must make the same calls."""
    paths = verified_paths(model)
    if static_shapes:
        reason = f"backend {backend_name!r} compiles static shapes"
        return dataclasses.replace(paths.without(list(SPEED_PATHS), reason), static_shapes=True)
    if share_prompt is False:
        paths = paths.without(["shared_prompt"], "--no-share-prompt")
    elif share_prompt is None and not share_prompt_default and paths.shared_prompt:
        paths = paths.without(["shared_prompt"], f"off by default on backend {backend_name!r}; "
                              "--share-prompt turns it on")
    if sharded and paths.shared_prompt:
        paths = paths.without(["shared_prompt"], "under --strategy fsdp every rank must run "
                              "the same forward calls")
    if gradient_checkpointing and not paths.layer_checkpointing and paths.shared_prompt:
        paths = paths.without(["shared_prompt"], "transformers' own activation checkpointing "
                              "turns the key/value cache off")
    if not gradient_checkpointing and paths.layer_checkpointing:
        paths = paths.without(["layer_checkpointing"], "no --gradient-checkpointing")
    return paths


def trusted(model: torch.nn.Module, paths: Paths) -> set[str]:
    """The speed paths exact for ``model``, whether this run takes them or not: verified for
    it, and not found wrong by ``check`` (``paths``' findings)."""
    return set(verified_paths(model).used()) - paths.inexact
