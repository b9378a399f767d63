"""Checkpoints that transformers loads as is, plus everything an exact resume needs.

Layout of ``OUTPUT/checkpoint-<step>/``::

    config.json, model.safetensors, tokenizer files   (a normal Hugging Face directory)
        (with --lora: adapter_config.json, adapter_model.safetensors, dpo_adapter.json:
        the adapter, in PEFT's format; ``dpo.core.model.lora``)
    trainer_state.json   step, data position, stopping-policy and loss state (human-readable)
    trainer_state.pt     optimizer, scheduler and random generator states

    dpo_manifest.json    every other file's size and SHA-256, written last

A checkpoint (and ``final/``, ``best/``) is written under a temporary name, forced to disk
(``fsync``: the files, then the directory), and renamed into place, the parent directory synced
after the rename; so a crash, a kill or a power loss leaves either the previous directory or the
new one, never a half-written one under the real name. The manifest makes a directory
verifiable: ``verify`` finds a missing, truncated or altered file, and ``resumable_checkpoint``
picks the newest checkpoint that verifies.

Only what this program wrote is ever replaced or pruned: a directory that carries the manifest
(or, written before manifests existed, ``trainer_state.json``/``dpo_best.json``), the marker of
a directory still being written, or nothing at all.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from dpo.core.model import lora
from dpo.core.model.dropout import saved_config
from dpo.core.model.loading import transformers_bars_off
from dpo.core.interfaces.errors import DpoError, UsageError, first_line, warn_on_stderr
from dpo.core.training.layout import FINAL, PREFIX, RUN_FILE

MANIFEST = "dpo_manifest.json"
MANIFEST_FORMAT = "dpo-checkpoint"
MANIFEST_VERSION = 1
NO_MANIFEST = "no manifest"
# In a directory while it is being written, removed once its manifest is: what a crash leaves
# under the temporary name is recognisably this program's, and the next write replaces it.
WRITING = ".dpo_writing"
# What directories written before manifests existed carry: a checkpoint's trainer state, best/'s
# record (dpo.core.training.loop.BEST_RECORD); final/ is recognised by the run record beside it.
LEGACY_MARKERS = ("trainer_state.json", "dpo_best.json")
_CHUNK = 1 << 20
_PATTERN = re.compile(rf"^{PREFIX}(\d+)$")


def fsync_path(path: Path) -> None:
    """Force a file's contents, or a directory's entries, to disk. Directories on file systems
    that cannot sync them (EINVAL) and on Windows (which cannot open one) are skipped."""
    is_dir = path.is_dir()
    if is_dir and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (is_dir and e.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then every directory, innermost first."""
    for root, _, files in os.walk(directory, topdown=False):
        for name in sorted(files):
            fsync_path(Path(root, name))
        fsync_path(Path(root))


def durable_replace(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` (already synced) to ``path`` and sync the parent directory, so that the new
    entry itself survives a power loss."""
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a synced temporary file and a rename: a reader
    sees the old file or the new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync_path(tmp)
        durable_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


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


def _write_model(tmp: Path, model: torch.nn.Module, tokenizer: Any,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    if lora.is_adapted(model):  # the adapter alone, in PEFT's format
        lora.write_adapter(tmp, model, state_dict)
        with transformers_bars_off():
            tokenizer.save_pretrained(tmp)
        return
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


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _files(directory: Path) -> list[str]:
    """The files under ``directory`` (relative POSIX names, sorted), bar the manifest and the
    marker of a write in progress."""
    names = [Path(root, name).relative_to(directory).as_posix()
             for root, _, files in os.walk(directory) for name in files]
    return sorted(n for n in names if n not in (MANIFEST, WRITING))


def write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of every file in ``directory``, in its manifest."""
    files = {}
    for name in _files(directory):
        size = (directory / name).stat().st_size
        files[name] = {"size": size, "sha256": _digest(directory / name)}
    record = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files}
    (directory / MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def verify(path: Path) -> str | None:
    """``None`` when every file the manifest of directory ``path`` lists is there with its size
    and SHA-256; otherwise a short reason (``NO_MANIFEST`` for a directory without one). Sizes
    are checked before any file is hashed, so a missing or truncated file is found at once."""
    if not path.is_dir():
        return "not a directory"
    if not any(path.iterdir()):
        return "empty directory"
    if not (path / MANIFEST).is_file():
        return NO_MANIFEST
    try:
        record = json.loads((path / MANIFEST).read_text())
        version, files = record["version"], record["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"unreadable {MANIFEST}"
    if record.get("format") != MANIFEST_FORMAT or version != MANIFEST_VERSION:
        return f"{MANIFEST} is version {version}; this dpo-trainer reads {MANIFEST_VERSION}"
    for name, size in sorted(sizes.items()):
        if not (path / name).is_file():
            return f"{name} is missing"
        actual = (path / name).stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, its manifest says {size}"
    for name in sorted(files):
        if _digest(path / name) != files[name].get("sha256"):
            return f"{name} differs from its manifest (SHA-256)"
    return None


def _legacy_problem(path: Path) -> str | None:
    """A checkpoint written before manifests existed: usable when its files load (changed bytes
    inside them cannot be found without a manifest). ``None``, or why not."""
    from safetensors import safe_open

    current = "trainer_state.json"
    try:
        json.loads((path / current).read_text())
        current = "trainer_state.pt"
        torch.load(path / current, map_location="cpu", weights_only=False)
        current = "config.json"
        json.loads((path / current).read_text())
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            return f"{NO_MANIFEST}, and no model weights (*.safetensors)"
        for current_path in weights:
            current = current_path.name
            with safe_open(str(current_path), framework="pt") as f:
                f.keys()
    except FileNotFoundError:
        return f"{NO_MANIFEST}, and {current} is missing"
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes its reader raise
        return f"{NO_MANIFEST}, and {current} does not load ({type(e).__name__})"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint directory ``path`` cannot be resumed from, or ``None``: it verifies against
    its manifest and holds a trainer state, or (written before manifests) its files load."""
    reason = verify(path)
    if reason == NO_MANIFEST:
        return _legacy_problem(path)
    if reason is None:
        listed = set(_files(path))
        for name in ("trainer_state.json", "trainer_state.pt"):
            if name not in listed:
                return f"not a checkpoint: no {name}"
    return reason


def has_manifest(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def resumable_checkpoint(output: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``output`` that can be resumed from (``checkpoint_problem``),
    and the newer ones passed over, newest first, each with its reason. Nothing is deleted."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(output)):
        reason = checkpoint_problem(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def written_here(path: Path) -> bool:
    """Whether directory ``path`` was written by this program, so that replacing or pruning it
    deletes nothing else: it carries the manifest or the marker of a write in progress, or
    (written before manifests existed) a trainer state or best/'s record, or it is a final/
    model directory beside a run record."""
    if path.is_symlink() or not path.is_dir():
        return False
    if any((path / name).is_file() for name in (MANIFEST, WRITING, *LEGACY_MARKERS)):
        return True
    base = re.sub(r"^\.|\.(tmp|old)$", "", path.name)
    return (base == FINAL and (path / "config.json").is_file()
            and (path.parent / RUN_FILE).is_file())


def removable(path: Path) -> bool:
    """Nothing there, an empty directory, or a directory this program wrote."""
    if not (path.exists() or path.is_symlink()):
        return True
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return True
    return written_here(path)


def _remove(path: Path) -> None:
    """Remove ``path``, which ``removable`` allowed."""
    if not (path.exists() or path.is_symlink()):
        return
    if any(path.iterdir()):
        shutil.rmtree(path)
    else:
        path.rmdir()


def _write_failed(path: Path, exc: BaseException) -> DpoError:
    """One line for an error while writing directory ``path``."""
    code = getattr(exc, "errno", None)
    if code is None:  # safetensors reports the OS error inside its own message
        found = re.search(r"code: (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    what = (os.strerror(code) if code else str(exc).splitlines()[0] if str(exc)
            else type(exc).__name__)
    todo = "free space" if code in (errno.ENOSPC, errno.EDQUOT) else "fix that"
    return DpoError(f"cannot write {path.name} under {path.parent}: {what}; "
                    f"{todo} and resume with --resume {path.parent}")


def _replace_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Have ``write(tmp)`` fill a temporary directory, add the manifest, sync it all and rename it
    to ``path`` (see the module's docstring). A directory in the way that this program did not
    write is refused before anything is written. A write error (a full disk) leaves the previous
    ``path`` as it was and nothing of the new one, and is one line."""
    from safetensors import SafetensorError

    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    for p in (path, tmp, old):
        if not removable(p):
            raise DpoError(f"{p}: in the way, and not written by dpo-trainer (no {MANIFEST}); "
                           f"move it out of {path.parent}, then resume with --resume {path.parent}")
    created = False
    try:
        _remove(tmp)
        tmp.mkdir(parents=True)
        created = True
        (tmp / WRITING).touch()
        write(tmp)
        write_manifest(tmp)
        (tmp / WRITING).unlink()
        fsync_tree(tmp)
        if path.exists():
            # Renaming over a non-empty directory is not atomic; move the old one aside first so
            # a crash between the two renames still leaves a complete copy on disk.
            _remove(old)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            fsync_path(path.parent)
            shutil.rmtree(old)
        else:
            durable_replace(tmp, path)
    except BaseException as exc:
        if created and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise _write_failed(path, exc) from None
        raise


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
    warn: Callable[[str], None] | None = None,
    weight_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``output/checkpoint-<step>`` and prune all but the newest ``keep`` checkpoints
    (``prune``; ``warn``: where its warnings go, standard error by default). ``weight_files``:
    more weights to keep beside the model's, file name -> tensors, written as safetensors
    (e.g. TR-DPO's reference, ``dpo.core.training.refupdate``); the manifest covers them."""
    path = output / f"{PREFIX}{step}"

    def write(tmp: Path) -> None:
        _write_model(tmp, model, tokenizer, state_dict)
        if weight_files:
            from safetensors.torch import save_file

            for name, weights in weight_files.items():
                save_file(weights, str(tmp / name))
        torch.save(tensors, tmp / "trainer_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")

    _replace_dir(path, write)
    prune(output, step, keep, warn)
    return path


_warned: set[Path] = set()


def prune(output: Path, step: int, keep: int, warn: Callable[[str], None] | None = None) -> None:
    """Remove this program's checkpoints up to ``step`` but the newest ``keep``. Newer ones (a
    damaged one passed over on resume, replaced when the run gets there) stay, and so does a
    ``checkpoint-N`` this program did not write, said once in a warning."""
    for path in _ours(output, step, warn)[:-keep]:
        _remove(path)


def remove_checkpoints(output: Path, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Remove every checkpoint this program wrote under ``output`` (a complete run's: they exist
    to resume it, ``final/`` holds its model); a ``checkpoint-N`` it did not write stays, as in
    ``prune``. Returns what was removed."""
    removed = _ours(output, None, warn)
    for path in removed:
        _remove(path)
    return removed


def _ours(output: Path, up_to: int | None, warn: Callable[[str], None] | None) -> list[Path]:
    """The checkpoints under ``output`` this program wrote (up to step ``up_to``), oldest
    first; one it did not write is said once in a warning."""
    ours = []
    for path in list_checkpoints(output):
        if up_to is not None and _step(path) > up_to:
            continue
        if removable(path):
            ours.append(path)
        elif path not in _warned:
            _warned.add(path)
            (warn or warn_on_stderr)(f"{path}: not written by dpo-trainer (no {MANIFEST}); "
                                      "left in place, and not counted among the checkpoints kept")
    return ours


def _step(path: Path) -> int:
    return int(path.name[len(PREFIX):])


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
    name = "trainer_state.json"
    try:
        state = json.loads((path / name).read_text())
        if not tensors:
            return state, None
        name = "trainer_state.pt"
        # weights_only=False: the file holds Python RNG state (tuples) written by this project.
        loaded = torch.load(path / name, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes its reader raise
        raise UsageError(f"{path / name}: cannot be read ({first_line(e, limit=200)}); the "
                         f"checkpoint is damaged: move {path} aside to resume from an older "
                         "one") from None
    return state, loaded
