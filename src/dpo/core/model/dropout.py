"""Dropout off for real, in policy and reference.

DPO compares log-probs of two models (and of one model before and after a step): any randomness
in the forward makes both noisy and unequal, so that at step 1, where the policy is the
reference, the loss is not ln 2 and half the pairs look ranked right or wrong by chance.

Turning off the ``nn.Dropout`` modules (what most trainers do) is not enough: many models read
a probability from their config and hand it to the attention kernel (``dropout_p``) or to
``F.dropout`` themselves, in training mode only: OPT, GPT-BigCode, XGLM, BioGPT, any
Llama-family config with a non-zero ``attention_dropout``, and others. So every place a
probability can live is set to zero:

1. every dropout module (``nn.Dropout`` and its kin): ``p = 0``;
2. every float attribute of a module whose name says dropout (``dropout``,
   ``attention_dropout``, ``attn_pdrop``, ``layerdrop``, ``drop_path_rate``, ...) or router
   jitter (``jitter_noise``): models copy these from their config when built;
3. the same names in the config and its sub-configs (``text_config``, ...): some models read
   them there at every forward.

The config's own values are written back whenever the model is saved (``saved_config``), so a
checkpoint's ``config.json`` is the user's, with the dropout they trained their model with.
``tests/test_architectures.py`` checks, on every architecture, that two forwards in training
mode with every dropout probability of the config at 0.1 give identical log-probs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

_ORIGINAL = "_dpo_config_dropout"  # model attribute: (config, name, value) written back on save


def is_dropout_name(name: str) -> bool:
    lowered = name.lower()
    return "drop" in lowered or "jitter" in lowered


def _configs(config: Any, seen: set[int] | None = None) -> Iterator[Any]:
    """The config and every sub-config inside it."""
    from transformers import PretrainedConfig

    seen = set() if seen is None else seen
    if id(config) in seen:
        return
    seen.add(id(config))
    yield config
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            yield from _configs(value, seen)


def _probability(value: Any) -> bool:
    return isinstance(value, float) and value > 0


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability of ``model`` (modules, their attributes, its config) to 0,
    remembering the config's values for ``saved_config``."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if not name.startswith("_") and is_dropout_name(name) and _probability(value):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    original = list(getattr(model, _ORIGINAL, []))
    for part in _configs(config):
        for name, value in list(vars(part).items()):
            if not name.startswith("_") and is_dropout_name(name) and _probability(value):
                original.append((part, name, value))
                setattr(part, name, 0.0)
    object.__setattr__(model, _ORIGINAL, original)  # not a module attribute: no state dict


@contextlib.contextmanager
def saved_config(model: torch.nn.Module) -> Iterator[None]:
    """The config's dropout probabilities as they were before ``disable_dropout``, while
    ``model`` is being saved."""
    original = getattr(model, _ORIGINAL, [])
    for part, name, value in original:
        setattr(part, name, value)
    try:
        yield
    finally:
        for part, name, _ in original:
            setattr(part, name, 0.0)
