"""Activation checkpointing (``--gradient-checkpointing``): each decoder layer keeps only its
input in forward and runs again in backward to rebuild what its gradient needs.

Our own wrapper rather than transformers' ``gradient_checkpointing_enable``, because that one
turns the key/value cache off inside checkpointed layers (a layer that writes the cache would
write it a second time when backward replays it), and the shared-prompt path
(``dpo.core.model.logps.shared_prompt_logps``) runs the completions on the prompts' cache. Its caches
are built to be replayed (``PromptCache``, ``PrefixCache``), so here the cache stays on and the
two techniques combine: the prompt runs once *and* only layer inputs are kept.

Non-reentrant checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False``): works when
inputs need no gradient, under DDP and FSDP2 (whose hooks sit on the module's call, outside
the checkpointed ``forward``), and stops recomputing a layer as soon as the saved tensors of
its backward are rebuilt.
"""

from __future__ import annotations

import functools
import types
import weakref
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


# Where transformers' decoders keep their repeated blocks: ``layers`` (Llama and most), ``h``
# (GPT-2, GPT-J, Bloom, Falcon, ...), ``blocks`` (MPT, DBRX, RWKV), ``layer`` (XLNet).
LAYER_LISTS = ("layers", "h", "blocks", "layer")


def decoder_layers_of(model: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The repeated blocks of ``model.get_decoder()`` (the ``ModuleList`` under the first of
    ``LAYER_LISTS`` it has; hybrid models mix attention and state-space blocks there), or
    None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        return None
    for name in LAYER_LISTS:
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    return None


# What ``checkpoint_layers`` was asked to call before each replay, by layer (weakly, so that a
# copy of a layer replays without it and nothing here keeps a layer alive).
_ON_REPLAY: weakref.WeakKeyDictionary[torch.nn.Module, Callable[[], None]] = (
    weakref.WeakKeyDictionary())


def _checkpointed_forward(self: torch.nn.Module, *args, **kwargs):
    forward = functools.partial(type(self).forward, self)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)  # no backward will replay it: evaluation, reference
    on_replay = _ON_REPLAY.get(self)
    calls = 0

    def run(*args, **kwargs):
        nonlocal calls
        calls += 1
        # The first call is forward; any later one, backward's replay.
        if calls > 1 and on_replay is not None:
            on_replay()
        return forward(*args, **kwargs)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def checkpoint_layers(model: torch.nn.Module,
                      on_replay: Callable[[], None] | None = None) -> bool:
    """Checkpoint every decoder layer of ``model`` (in place); False when it has none to find
    (the caller then falls back to transformers' own, without the shared prompt).

    The layer's ``forward`` is replaced on the instance by one that looks the class's up at
    each call, so copies (``copy.deepcopy``) and FSDP2's per-class wrappers keep working.
    ``on_replay`` (e.g. ``Backend.release_memory``) is called in backward before each layer
    runs again: between two layers' backward is where the memory the last one freed can go
    back to the system before the next one's peak.
    """
    layers = decoder_layers_of(model)
    if layers is None:
        return False
    for layer in layers:
        layer.forward = types.MethodType(_checkpointed_forward, layer)
        if on_replay is not None:
            _ON_REPLAY[layer] = on_replay
    return True


def is_checkpointed(layer: torch.nn.Module) -> bool:
    """Whether ``checkpoint_layers`` wrapped this layer."""
    forward = layer.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward
