"""``dpo merge`` and ``--merge``: a LoRA adapter folded into its base model, written as a plain
transformers model directory (no ``peft`` needed to load it).

The base is loaded the way the run loaded it (``dpo_adapter.json`` names it, see
``dpo.core.model.lora``), the adapter's weights go in and are merged (W + B A alpha / r), and
the result is written atomically with the program's manifest, like ``final/``.
"""

from __future__ import annotations

from pathlib import Path

from dpo.core.interfaces.errors import UsageError
from dpo.core.model import lora
from dpo.core.model.loading import load_model
from dpo.core.training import rundir
from dpo.core.training.checkpoint import MANIFEST, removable, save_model_dir
from dpo.core.training.layout import FINAL, MERGED


def merge_target(path: Path, output: Path | None) -> tuple[Path, Path]:
    """(adapter directory, where the merged model goes) for ``dpo merge PATH [--output]``:
    PATH is a run directory (its ``final/``; default output its ``merged/``) or an adapter
    directory (default output ``merged/`` beside it when it sits in a run directory)."""
    if not path.exists():
        raise UsageError(f"{path}: no such directory; give a run directory or an adapter "
                         "directory (one with adapter_config.json)")
    adapter = path / FINAL if rundir.is_run_dir(path) and not lora.is_adapter_dir(path) else path
    if not lora.is_adapter_dir(adapter):
        what = ("its final/ holds a full model, not a LoRA adapter (the run trained every "
                "weight: it is already a plain model)") if adapter != path else \
            "not a LoRA adapter directory (no adapter_config.json)"
        raise UsageError(f"{adapter}: {what}; nothing to merge")
    if output is None:
        if not rundir.is_run_dir(adapter.parent):
            raise UsageError(f"{adapter}: not inside a run directory, so there is no default "
                             "place for the merged model; give --output DIR")
        output = adapter.parent / MERGED
    if output.resolve() == adapter.resolve():
        raise UsageError(f"--output {output}: that is the adapter itself; choose another")
    if output.exists() and not removable(output):
        raise UsageError(f"{output}: already exists and was not written by dpo-trainer (no "
                         f"{MANIFEST}); choose another --output or move it away")
    if output.exists() and output.is_file():
        raise UsageError(f"{output}: is a file; choose another --output")
    return adapter, output


def merge_adapter(adapter: Path, output: Path, trust_remote_code: bool = False) -> Path:
    """Write ``adapter`` merged into its base model to ``output``; returns ``output``.
    ``trust_remote_code``: the base ships its own modelling code, and it may run."""
    # An adapter names its own seed (the tiny model's weights depend on it).
    model, tokenizer = load_model(str(adapter), seed=0, trust_remote_code=trust_remote_code)
    save_model_dir(output, model, tokenizer)
    return output
