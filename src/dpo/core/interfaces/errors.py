"""Errors that reach the user as one line, never as a traceback."""

from __future__ import annotations

import sys


def first_line(exc: BaseException, limit: int | None = 300, fallback: str | None = None) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters, for a one-line error
    that quotes it; ``fallback`` (default: the exception's type name) when it says nothing."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if fallback is None else fallback
    return text.splitlines()[0][:limit]


def warn_on_stderr(message: str) -> None:
    """One warning line on the current stderr (looked up at the call, so captures see it)."""
    sys.stderr.write(f"warning: {message}\n")


class DpoError(Exception):
    """A problem the user can fix. The CLI prints ``str(error)`` on one line and exits with
    ``exit_code``."""

    exit_code = 1


class Interrupted(DpoError):
    """The run was stopped by Ctrl-C (or a termination signal); the message says how to go on."""

    exit_code = 130


class UsageError(DpoError):
    """Bad command-line or configuration input (unknown name, bad option value)."""

    exit_code = 2


class DataError(DpoError):
    """A data file that cannot be used. Says file and line when one is known."""

    exit_code = 2

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}")
        self.path, self.line = path, line


class UnknownNameError(UsageError):
    """A name asked for that no installed plugin provides."""

    def __init__(self, kind: str, name: str, available: list[str]):
        installed = ", ".join(sorted(available)) or "none"
        super().__init__(f"unknown {kind} {name!r}; installed: {installed}")
        self.kind, self.name, self.available = kind, name, sorted(available)


class DuplicateNameError(DpoError):
    """Two plugins registered the same name for the same kind of thing."""

    def __init__(self, kind: str, name: str, first: str, second: str):
        super().__init__(
            f"{kind} {name!r} is registered twice: by plugin {first!r} and by plugin {second!r}; "
            f"uninstall one or block it with DPO_DISABLE_PLUGINS"
        )
        self.kind, self.name, self.first, self.second = kind, name, first, second
