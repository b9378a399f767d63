"""Checkpoints that transformers loads as is, plus everything an exact resume needs.

Layout of ``OUTPUT/checkpoint-<step>/``::

    config.json, model.safetensors, tokenizer files   (a normal Hugging Face directory)
    trainer_state.json   step, data position, stopping-policy state (human-readable)
    trainer_state.pt     optimizer, scheduler and random generator states

A checkpoint is written under a temporary name and renamed into place, so a crash leaves either
the previous checkpoint or the new one, never a half-written directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from dpo.core.dropout import saved_config

PREFIX = "checkpoint-"
FINAL = "final"
_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def save_model_dir(path: Path, model: torch.nn.Module, tokenizer: Any,
                   extra: dict[str, Any] | None = None,
                   state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``model`` and ``tokenizer`` as a Hugging Face directory, atomically, with ``extra``
    JSON files (file name -> content) beside them. ``state_dict``: the weights to write instead
    of the model's own (e.g. gathered from FSDP shards)."""
    def write(tmp: Path) -> None:
        _write_model(tmp, model, tokenizer, state_dict)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")

    _replace_dir(path, write)


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """Silence transformers' own progress bars (shard writing, weight loading) for a while;
    a run already shows its progress, and a load is a second or two."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_model(tmp: Path, model: torch.nn.Module, tokenizer: Any,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    with transformers_bars_off():
        host = state_dict if state_dict is not None else _host_state_dict(model)
        with saved_config(model):  # the user's dropout, not the zeros training runs with
            model.save_pretrained(tmp, safe_serialization=True, state_dict=host)
        _match_config_dtype(tmp, host if host is not None else model.state_dict())
        tokenizer.save_pretrained(tmp)


def _host_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """CPU copies of the weights when they are XLA tensors, which have no host storage for
    safetensors to read; ``None`` (save as is) otherwise. Tied weights (one Parameter under two
    names) stay one tensor, so transformers still recognises them as tied."""
    if not any(p.device.type == "xla" for p in model.parameters()):
        return None
    tensors = model.state_dict(keep_vars=True)
    copies: dict[int, torch.Tensor] = {}
    for t in tensors.values():
        if id(t) not in copies:
            copies[id(t)] = t.detach().cpu()
    return {name: copies[id(t)] for name, t in tensors.items()}


def _match_config_dtype(directory: Path, state: dict[str, torch.Tensor]) -> None:
    """transformers records the dtype of the model's parameters in config.json, and loads in it
    by default. Under Intel's bf16 training the parameters are bf16 copies while the weights
    written are the float32 masters: record the dtype actually written."""
    written = {t.dtype for t in state.values() if t.is_floating_point()}
    config_path = directory / "config.json"
    if len(written) != 1 or not config_path.is_file():
        return
    dtype = str(written.pop()).removeprefix("torch.")
    config = json.loads(config_path.read_text())
    if config.get("dtype", dtype) != dtype:
        config["dtype"] = dtype
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _replace_dir(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if path.exists():
        # Renaming over a non-empty directory is not atomic; move the old one aside first so a
        # crash between the two renames still leaves a complete copy on disk.
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def rng_states(backend_state: Any) -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state(), "device": backend_state}


def restore_rng_states(states: dict[str, Any]) -> Any:
    """Restore host generators; return the device state for the backend to restore."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    return states["device"]


def save_checkpoint(
    output: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    state: dict[str, Any],
    tensors: dict[str, Any],
    keep: int,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``output/checkpoint-<step>`` and prune all but the newest ``keep`` checkpoints."""
    path = output / f"{PREFIX}{step}"

    def write(tmp: Path) -> None:
        _write_model(tmp, model, tokenizer, state_dict)
        torch.save(tensors, tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")

    _replace_dir(path, write)
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old)
    return path


def list_checkpoints(output: Path) -> list[Path]:
    """Complete checkpoints under ``output``, oldest first."""
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if (m := _PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output: Path) -> Path | None:
    checkpoints = list_checkpoints(output)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint_state(path: Path, tensors: bool = True
                          ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(trainer_state.json, trainer_state.pt) of a checkpoint directory; ``tensors=False``
    reads only the JSON part."""
    state = json.loads((path / "trainer_state.json").read_text())
    if not tensors:
        return state, None
    # weights_only=False: the file holds Python RNG state (tuples) written by this project.
    loaded = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    return state, loaded
