"""Loading the policy and the tokenizer named by ``--model``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dpo.core.errors import UsageError
from dpo.core.tiny import TINY_NAME, build_tiny_model, build_tiny_tokenizer


def load_model(spec: str, seed: int) -> tuple[torch.nn.Module, Any]:
    """(model in float32, tokenizer) for ``spec``: ``tiny``, a local Hugging Face directory, or a
    hub id. Training keeps float32 master weights; ``--dtype`` applies through autocast."""
    if spec == TINY_NAME:
        tokenizer = build_tiny_tokenizer()
        return build_tiny_model(tokenizer, seed=seed), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    if path.exists() and not (path / "config.json").is_file():
        raise UsageError(f"--model {spec}: {path} is not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model {spec}: could not load it ({first})") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out; any id works, EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
