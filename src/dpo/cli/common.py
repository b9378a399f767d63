"""What every command shares: one-line errors (a DpoError, a usage error, Ctrl-C) instead of a
traceback or a boxed panel."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from dpo.core.interfaces.errors import DpoError

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one error line and return the Exit to raise. The message is printed as given:
    brackets in it (paths, ``dpo-trainer[gguf]``) are text, not markup, and line breaks (from a
    path or a library's message) are folded so that it stays one line."""
    line = " ".join(message.splitlines())
    err_console.print(f"[red]error:[/] {escape(line)}", markup=True)
    return typer.Exit(code)


def one_line_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a DpoError into one line on stderr and its exit code, with no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DpoError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except OSError as exc:  # the system refused a path no check foresaw (a name too long)
            where = f"{exc.filename}: " if exc.filename else ""
            raise fail(f"{where}{exc.strerror or exc}", 1) from None
        except KeyboardInterrupt:
            raise fail("interrupted; resume with --resume", 130) from None

    return wrapper


@contextmanager
def _usage_errors_in_one_line() -> Iterator[None]:
    try:
        yield
    except typer.TyperException as exc:  # Click's usage errors: a flag's bad value, a typo
        if type(exc).__name__ == "NoArgsIsHelpError":  # prints the help, not an error
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
        raise fail(f"{exc.format_message().rstrip('.')}{hint}", exc.exit_code) from None


class OneLineUsageErrors(TyperGroup):
    """Typer prints a usage error in a boxed panel over several lines, wrapped at the terminal's
    width; here it is one line, like every other error."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _usage_errors_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:  # parses the subcommand's flags, then runs it
        with _usage_errors_in_one_line():
            return super().invoke(ctx)
