"""The ``dpo`` command line. ``make_app(pm)`` builds the Typer app from a plugin manager, so
tests build a fresh app per plugin set and nothing is registered at import time."""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from typing import NoReturn

import typer

from dpo.cli.common import OneLineUsageErrors, fail, one_line_errors  # noqa: F401
from dpo.core.interfaces.errors import DpoError
from dpo.core.interfaces.plugins import DpoPluginManager, call_impl, collect, get_plugin_manager, hook_impls

PLUGIN_PANEL = "Plugins"


def make_app(pm: DpoPluginManager) -> typer.Typer:
    """The root app: built-in commands, then every plugin's ``dpo_register_commands``."""
    from dpo.cli import backends, demo, evaluate, merge, paths, plugins, precompute, run, sample
    from dpo.cli import sweep
    from dpo.cli import report

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
    sample.register(app, catalog)
    precompute.register(app, catalog)
    merge.register(app, catalog)
    demo.register(app, catalog)
    plugins.register(app, pm, catalog, commands_by_plugin)
    backends.register(app, catalog)
    paths.register(app, catalog)
    sweep.register(app, catalog)
    report.register(app, catalog)
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
    from dpo.core.training.strategy import launched_by_torchrun

    args = argv if argv is not None else sys.argv[1:]
    if not launched_by_torchrun():
        app(args=args, prog_name="dpo")
        return
    try:
        app(args=args, prog_name="dpo")
        code = 0
    except SystemExit as exc:  # how click ends every command
        code = _exit_status(exc.code)
    except BaseException:  # what the interpreter would print, then the same status
        traceback.print_exc()
        code = 1
    _leave(code)


def _exit_status(code: object) -> int:
    """The process status that ``SystemExit(code)`` gives (a message is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _leave(code: int) -> NoReturn:
    """A torchrun worker's end, its work done and its exit code known: the exit handlers run
    (loggers, log files), the output is flushed, and the process ends without the interpreter's
    teardown. That teardown (joining threads, then freeing what torch's C++ side still holds,
    Gloo's and autograd's threads included) can deadlock now and then after a process group
    has been used (pytorch/pytorch#190489), leaving a finished run's process, and so torchrun
    and ``--nproc``, waiting forever."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)
