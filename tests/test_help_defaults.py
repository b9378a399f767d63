"""`--help` shows every option's default, and the default shown is the one a run takes:
RunConfig's (and the demo preset's, for the demo data), never a copy that could drift."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.training.config import RunConfig
from dpo.core.training.demo import DEMO_PRESET
from dpo.core.interfaces.plugins import get_plugin_manager

# Options that have no default value to show: a list that starts empty, a file or a run
# directory named only when wanted.
NO_DEFAULT = {"option", "config", "resume", "as_json", "help"}
# The default written at the end of a help text; rich's help would drop it unescaped.
SHOWN = re.compile(r"\\\[default: (?P<value>.*)\]$")


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return make_app(get_plugin_manager(load_entrypoints=False))


def command(app: typer.Typer, name: str) -> Any:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def parsed(shown: str, like: Any) -> Any:
    """A value as help writes it, read back as the type of ``like``."""
    if isinstance(like, bool):
        assert shown in ("on", "off"), shown
        return shown == "on"
    if isinstance(like, (int, float)):
        return type(like)(float(shown))
    if isinstance(like, list):
        return shown.split(", ")
    return shown


def shows_default(param: Any) -> bool:
    """Whether the help of ``param`` shows a default: written at the end of its text, or a
    literal default that typer shows by itself."""
    if SHOWN.search(param.help or ""):
        return True
    return (param.default is not None and param.show_default is not False
            and not (param.is_flag and not param.secondary_opts))


def options(cmd: Any) -> list[Any]:
    return [p for p in cmd.params if p.param_type_name == "option"]


def check_defaults(cmd: Any, config: bool = True) -> list[str]:
    """Every option but NO_DEFAULT and the required ones shows a default; with ``config``,
    those that are RunConfig fields show RunConfig's value, then the demo preset's where it
    differs. Returns the names of the options that show one."""
    for param in options(cmd):
        if param.name in NO_DEFAULT or param.required:
            continue
        assert shows_default(param), param.name
        found = SHOWN.search(param.help or "")
        if not config or found is None or param.name not in RunConfig.model_fields:
            continue
        value = RunConfig.model_fields[param.name].get_default(call_default_factory=True)
        base, _, demo = found["value"].partition("; ")
        if value is not None:
            assert parsed(base, value) == value, (param.name, base, value)
        if param.name in DEMO_PRESET and DEMO_PRESET[param.name] != value:
            assert demo.endswith(" with --data demo"), (param.name, demo)
            preset = demo.removesuffix(" with --data demo")
            assert parsed(preset, DEMO_PRESET[param.name]) == DEMO_PRESET[param.name]
        else:
            assert demo == "", (param.name, demo)
    return [p.name for p in options(cmd) if shows_default(p)]


def test_every_option_of_run_shows_runconfigs_default(app):
    """Every option of `dpo run` but -o, --config and --resume (and --help) shows a default;
    lr shows 1e-06 (RunConfig) and 5e-05 (the demo preset), and so on for each."""
    run = command(app, "run")
    shown = check_defaults(run)
    assert {p.name for p in options(run)} - set(shown) == {"option", "config", "resume"}
    assert len(shown) >= 40
    lr = next(p for p in run.params if p.name == "lr")
    assert lr.help.endswith(r"\[default: 1e-06; 5e-05 with --data demo]")


def test_precompute_ref_shows_the_same_defaults(app):
    check_defaults(command(app, "precompute-ref"))


def test_eval_shows_its_defaults(app):
    """`dpo eval` has defaults of its own (the evaluated run's settings), not RunConfig's."""
    check_defaults(command(app, "eval"), config=False)


@pytest.mark.parametrize("name", ["run", "sft", "precompute-ref", "eval"])
def test_the_rendered_help_keeps_the_defaults(app, name):
    """Rendered by rich, each shown default is still there: as many "[default:" as options
    showing one (unescaped brackets would be taken for markup and vanish)."""
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.count("[default:") == len(check_defaults(command(app, name),
                                                                  config=False))
