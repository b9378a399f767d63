"""The run directory: what may be one, what a run writes there, and what it may remove.

A run directory is marked by ``run.json``, written as soon as the directory is taken (before
the model loads), and holds only what the run writes: ``run.json``, ``metrics.jsonl``,
``samples.jsonl``, ``checkpoint-N/``, ``best/``, ``final/`` and their temporary names (``.NAME.tmp``,
``.NAME.old``). ``--overwrite`` removes exactly those, and only in a directory that ``run.json``
marks as a dpo run; a user's own files there stay. The current directory (or any directory
above it), the home directory (or above), ``/`` and an empty path are never an output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dpo.core.training.checkpoint import removable
from dpo.core.interfaces.errors import UsageError
from dpo.core.training.layout import METRICS_FILE, RUN_FILE, SAMPLES_FILE

# Directories a run writes (each says so, or is empty: ``checkpoint.removable``).
_DIRS = re.compile(r"^(checkpoint-\d+|best|final|merged)$")
_TEMPORARY = re.compile(r"^\.(checkpoint-\d+|best|final|merged|run\.json|metrics\.jsonl|samples\.jsonl)\.(tmp|old)$")
FINISHED = ("completed", "stopped by ")


def check_output(output: str | Path, flag: str = "--output") -> Path:
    """``output`` as a path a run may take, or a one-line error: never the current directory
    or one above it, the home directory or one above it, or an empty path; not a file; and
    somewhere this process can create and write files. Checked before any work."""
    if str(output).strip() == "":
        raise UsageError(f"{flag} is empty (an unset shell variable?); name a run directory, "
                         "e.g. --output out")
    path = Path(output).expanduser()
    resolved = path.resolve()
    for kept, name in ((Path.cwd().resolve(), "the current directory"),
                       (Path.home().resolve(), "your home directory")):
        if kept == resolved or resolved in kept.parents:
            what = name if kept == resolved else f"a directory above {name}"
            raise UsageError(f"{flag} {output}: that is {what}, which is never a run directory; "
                             f"name a new directory, e.g. {flag} {path / 'out'}")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {output}: exists and is not a directory; name a directory")
    _check_creatable(resolved, flag, output, "a directory")
    return path


def check_file_target(path: str | Path, flag: str) -> Path:
    """A file this run will write (e.g. ``--ref-logps``): not a directory, under a directory
    this process can write to. Whether an existing file may be replaced is the caller's call."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; name a file")
    _check_creatable(target.resolve().parent, flag, path, "a file in a directory")
    return target


def _check_creatable(where: Path, flag: str, shown: str | Path, kind: str) -> None:
    """``where`` (or the nearest directory above it that exists) is a directory this process
    can create files in."""
    existing = next((p for p in (where, *where.parents) if p.exists()), Path("/"))
    if not existing.is_dir():
        raise UsageError(f"{flag} {shown}: {existing} is a file, so nothing can be created "
                         f"under it; name {kind}")
    if not _writable(existing):
        raise UsageError(f"{flag} {shown}: {existing} is not writable by this user; choose a "
                         "directory you can write to")


def _writable(directory: Path) -> bool:
    if not os.access(directory, os.W_OK | os.X_OK):
        return False
    try:  # a read-only file system says yes to access() for root: try it
        tempfile.TemporaryDirectory(dir=directory, prefix=".dpo-probe-").cleanup()
    except OSError:
        return False
    return True


def is_run_dir(path: Path) -> bool:
    return (path / RUN_FILE).is_file()


def run_written(path: Path) -> list[Path]:
    """What a run wrote in ``path``: its files, its directories that carry a run's marker, and
    temporary leftovers of its atomic writes. A user's own files are not in the list."""
    found = []
    for entry in sorted(path.iterdir()) if path.is_dir() else []:
        if entry.is_symlink():
            continue
        if entry.name in (RUN_FILE, METRICS_FILE, SAMPLES_FILE) and entry.is_file():
            found.append(entry)
        elif _TEMPORARY.match(entry.name):
            found.append(entry)
        elif _DIRS.match(entry.name) and entry.is_dir() and removable(entry):
            found.append(entry)
    return found


def clear_run(path: Path) -> list[Path]:
    """Remove what a run wrote in ``path`` (see ``run_written``); only in a run directory."""
    if not is_run_dir(path):
        raise UsageError(f"{path}: not a dpo run directory (no {RUN_FILE}); --overwrite only "
                         "replaces a run; choose another --output or empty it yourself")
    removed = run_written(path)
    for entry in removed:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return removed


def read_json_record(path: Path, kind: str, damaged: str) -> Any:
    """The JSON in ``path`` (a ``kind`` directory's record), or a one-line error: missing, or
    damaged with ``damaged`` saying what to do."""
    if not path.is_file():
        raise UsageError(f"{path.parent}: no {path.name}; is this a dpo {kind} directory?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: damaged ({exc}); {damaged}") from None


def read_record(output: Path) -> dict[str, Any]:
    """``output/run.json``, or a one-line error saying what is wrong with it."""
    path = output / RUN_FILE
    record = read_json_record(path, "run", "it is rebuilt from the newest checkpoint on --resume "
                              "when there is one")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise UsageError(f"{path}: not a run record (no config); is this a dpo run directory?")
    return record


def finished(record: dict[str, Any], output: Path) -> bool:
    """Whether the run recorded in ``output`` ended and wrote its final model."""
    status = str(record.get("status", ""))
    return status.startswith(FINISHED) and (output / "final").is_dir()


def extends(recorded: dict[str, Any], config: dict[str, Any], status: str = "") -> bool:
    """Whether ``config`` asks a finished run for more training than ``recorded`` gave it: other
    steps or epochs, or a higher limit that its stopping policy stopped it at (``raised``)."""
    return (any(config.get(key) != recorded.get(key) for key in ("max_steps", "epochs"))
            or raised(recorded, config, status))


# A limit that a stop's reason names as ``option=value`` ("... reached max_pairs=24").
_NAMED_LIMIT = re.compile(r"\b([A-Za-z_][\w-]*)=")


def raised(recorded: dict[str, Any], config: dict[str, Any], status: str) -> bool:
    """Whether the run that ``status`` says a stopping policy stopped ("stopped by NAME:
    REASON") is given a higher value (or none) for an option that REASON names as
    ``option=value``, the limit it reached (budget's ``max_pairs=24``): then it may go on. Any
    other change of the policy's options (a new ``max_time`` for each job) does not reopen it."""
    found = re.match(r"stopped by ([^:]+): (.*)", status)
    if not found:
        return False
    name, reason = found.groups()
    before, after = ((c.get("options") or {}).get(name) or {} for c in (recorded, config))
    for key in set(_NAMED_LIMIT.findall(reason)) & set(before):
        if key not in after or after[key] in (None, ""):
            return True  # the limit is gone
        try:
            if float(after[key]) > float(before[key]):
                return True
        except (TypeError, ValueError):
            if str(after[key]) != str(before[key]):
                return True
    return False


def reopen_hint(record: dict[str, Any]) -> str:
    """For a run that a stopping policy stopped at a limit its reason names (``raised``): how
    to go on ("; raise the limit it reached to go on, e.g. -o budget.max_pairs=HIGHER"), or
    nothing."""
    found = re.match(r"stopped by ([^:]+): (.*)", str(record.get("status", "")))
    if not found:
        return ""
    options = ((record.get("config") or {}).get("options") or {}).get(found[1]) or {}
    named = [key for key in _NAMED_LIMIT.findall(found[2]) if key in options]
    return (f"; raise the limit it reached to go on, e.g. -o {found[1]}.{named[0]}=HIGHER"
            if named else "")


def nothing_to_resume(record: dict[str, Any], output: Path, config: dict[str, Any]) -> bool:
    """A ``--resume`` of the run in ``output`` with ``config`` has nothing to do: the run is
    finished and ``config`` asks for no more training."""
    return finished(record, output) and not extends(record["config"], config,
                                                    str(record.get("status", "")))


def resume_hint(output: Path, newest: Path | None) -> str:
    """How to go on with an interrupted run in ``output`` whose newest checkpoint is ``newest``:
    the end of a sentence that starts with what happened ("interrupted", "stopped at step 3")."""
    if newest is None:
        return (f" before the first checkpoint; --resume {output} starts the run again from "
                "step 0")
    return f"; resume with --resume {output} (from {newest.name})"
