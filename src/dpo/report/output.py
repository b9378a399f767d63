"""The report's directory: written whole into a temporary directory beside it, then moved into
place, so that a reader never sees half a report. A manifest names the files the report wrote;
a later report replaces exactly those (each by an atomic rename) and leaves anything else a user
put there alone, and a directory without the manifest that is not empty is never written into."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dpo.core.interfaces.errors import UsageError

MANIFEST = ".dpo-report.json"  # {"written_by": "dpo report", "files": [names]}


def _written(output: Path) -> list[str] | None:
    """The files a previous report wrote in ``output``, or None when no report wrote it."""
    try:
        manifest = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return [f for f in files if f and "/" not in f and f not in (".", "..")]


def check_output(output: Path, flag: str = "--output") -> None:
    """``output`` is new, empty, or a report's own directory; anything else is refused."""
    if output.exists() and not output.is_dir():
        raise UsageError(f"{flag} {output}: exists and is not a directory; name a directory "
                         "for the report")
    if output.is_dir() and any(output.iterdir()) and _written(output) is None:
        raise UsageError(f"{output}: exists and was not written by dpo report (no {MANIFEST}); "
                         f"name another directory with {flag}, or empty this one")


@contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A temporary directory to write the report in; on success its files replace the
    report's in ``output``, on failure it goes and ``output`` is as it was."""
    check_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its directory is private (0700), and it becomes the report's own.
    stage = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        publish(stage, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, output: Path) -> None:
    files = sorted(p.name for p in stage.iterdir() if p.is_file())
    (stage / MANIFEST).write_text(json.dumps({"written_by": "dpo report", "files": files},
                                             indent=2) + "\n", encoding="utf-8")
    if not output.exists():
        stage.rename(output)
        return
    check_output(output)  # again: something may have appeared there meanwhile
    before = _written(output) or []
    for name in files:
        os.replace(stage / name, output / name)
    for name in set(before) - set(files):  # a figure this report no longer draws
        stale = output / name
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()
    os.replace(stage / MANIFEST, output / MANIFEST)  # last: it names what is there now
