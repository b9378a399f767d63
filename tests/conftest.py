"""Shared test setup: dpo's own pytest plugin (fixtures and the ``backend`` marker), enabled the
way a plugin author would enable it."""

pytest_plugins = ["dpo.testing"]

import os
from pathlib import Path

import pytest

# Output in tests is not a terminal whatever the caller's environment says: the first three
# would make rich treat it as one (colours, a live bar, wrapped lines), and the caller's
# terminal size would set the width of tables (tests that want a size set it). Removed before
# any console is made, since a console reads some of them when it is created.
for _name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "LINES"):
    os.environ.pop(_name, None)


@pytest.fixture(autouse=True, scope="session")
def _xla_runtime_first():
    """Where torch_xla is installed and PJRT_DEVICE chosen, start the XLA runtime before the
    session's first backward pass, whichever test comes first: autograd sizes its per-device
    queues at the first backward, and a process whose first backward ran before XLA's device
    existed cannot serve XLA tensors later."""
    if os.environ.get("PJRT_DEVICE"):
        try:
            import torch_xla
        except ImportError:
            return
        torch_xla.device()


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Runs in tests keep converted models and reference log-probs in a cache of their own,
    not the user's (tests that need a particular cache set DPO_CACHE_DIR themselves)."""
    previous = os.environ.get("DPO_CACHE_DIR")
    os.environ["DPO_CACHE_DIR"] = str(tmp_path_factory.mktemp("dpo-cache"))
    yield
    if previous is None:
        os.environ.pop("DPO_CACHE_DIR", None)
    else:
        os.environ["DPO_CACHE_DIR"] = previous



@pytest.fixture
def bos_tok():
    """The tiny tokenizer made to put a BOS (here <|endoftext|>) in front of every text by
    itself, as Llama's tokenizers do (the tiny one adds none)."""
    from tokenizers import processors

    from dpo.core.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)])
    assert tokenizer("ab").input_ids == [tokenizer.bos_token_id, 97, 98]
    return tokenizer


@pytest.fixture
def invoke(monkeypatch, tmp_path):
    """The command line with the ``crash-at`` test policy installed, in a cache of its own
    (a module that means another command line by ``invoke`` defines its own)."""
    from dpo.testing import CrashAt, command_line, plugin_of

    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    return command_line(plugin_of(CrashAt))


@pytest.fixture
def pairs(tmp_path) -> Path:
    """The arithmetic preference pairs of ``dpo.testing``, as a JSONL file."""
    from dpo.testing import write_arithmetic_pairs

    return write_arithmetic_pairs(tmp_path / "pairs.jsonl")
