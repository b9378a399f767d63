"""The ``dpo`` command line. ``make_app(pm)`` builds the Typer app from a plugin manager, so
tests build a fresh app per plugin set and nothing is registered at import time."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from dpo.core.errors import DpoError
from dpo.core.plugins import DpoPluginManager, call_impl, collect, get_plugin_manager, hook_impls

PLUGIN_PANEL = "Plugins"
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


def make_app(pm: DpoPluginManager) -> typer.Typer:
    """The root app: built-in commands, then every plugin's ``dpo_register_commands``."""
    from dpo.cli import backends, evaluate, paths, plugins, precompute, run

    app = typer.Typer(
        name="dpo",
        help="Align language models with preference pairs: DPO and its relatives, on any accelerator.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        cls=OneLineUsageErrors,
    )
    catalog = collect(pm)
    commands_by_plugin: dict[str, list[str]] = {}  # filled below, read by `dpo plugins`
    run.register(app, catalog)
    evaluate.register(app, catalog)
    precompute.register(app, catalog)
    plugins.register(app, pm, catalog, commands_by_plugin)
    backends.register(app, catalog)
    paths.register(app, catalog)
    for impl in hook_impls(pm, "dpo_register_commands"):
        before = len(app.registered_commands)
        try:
            call_impl(impl, app=app)
        except Exception as exc:  # a broken plugin command must not take the CLI down
            del app.registered_commands[before:]
            # A failed plugin registers nothing: its losses, backends, ... go too.
            catalog.withdraw(impl.plugin_name, pm.fail(impl.plugin_name, exc).error)
            continue
        added = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands[before:]]
        if added:
            commands_by_plugin[impl.plugin_name] = added
        for command in app.registered_commands[before:]:  # their DpoErrors print as ours do
            command.callback = one_line_errors(command.callback)
    return app


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app = make_app(get_plugin_manager())
    except DpoError as exc:  # e.g. a name two plugins register
        raise SystemExit(fail(str(exc), exc.exit_code).exit_code) from None
    app(args=argv if argv is not None else sys.argv[1:], prog_name="dpo")
