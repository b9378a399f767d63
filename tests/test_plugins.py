"""The plugin manager: built-ins as plugins, entry points, blocking, isolation, duplicates."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

import dpo
from dpo.core.interfaces import hookspecs
from dpo.core.interfaces.errors import DuplicateNameError, UnknownNameError
from dpo.core.interfaces.plugins import (
    DEFAULT_PLUGINS,
    DpoPluginManager,
    collect,
    get_plugin_manager,
    register_plugin,
)


def make_distribution(root: Path, dist: str, version: str, entry_points: dict[str, str],
                      modules: dict[str, str]) -> None:
    """A fake installed distribution: a .dist-info folder that importlib.metadata finds on
    sys.path, plus its plugin modules."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[dpo]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


GOOD_LOSS = """
    import torch, dpo

    class Sum(dpo.Loss):
        name = "fake-sum"
        requires_reference = False
        def __call__(self, logps):
            losses = -(logps.policy_chosen - logps.policy_rejected)
            return dpo.LossOutput(losses, logps.policy_chosen.detach(), logps.policy_rejected.detach())

    @dpo.hookimpl
    def dpo_register_losses(register):
        register(Sum)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_are_registered_from_default_plugins_like_third_parties():
    pm = get_plugin_manager(load_entrypoints=False)
    for name in DEFAULT_PLUGINS:
        assert pm.has_plugin(name)
        assert pm.sources[name].distribution == "dpo-trainer" and pm.sources[name].builtin
    catalog = collect(pm)
    assert {"cpu", "cuda", "rocm", "xpu", "xla"} <= set(catalog.backends.names())
    assert {"dpo", "cdpo", "ipo"} <= set(catalog.losses.names())
    assert "nan-guard" in catalog.stopping.names()
    assert catalog.formats.names() == ["chat", "hh", "messages", "preference", "prompt-completion",
                                      "unpaired"]


def test_each_call_returns_a_fresh_manager():
    first, second = get_plugin_manager(), get_plugin_manager()
    first.unregister(name="dpo.plugins.losses.ipo")
    assert "ipo" not in collect(first).losses.names()
    assert "ipo" in collect(second).losses.names()


def test_disable_env_blocks_a_builtin_and_unknown_names_list_what_is_installed():
    pm = get_plugin_manager(environ={"DPO_DISABLE_PLUGINS": "dpo.plugins.losses.ipo, other"})
    catalog = collect(pm)
    with pytest.raises(UnknownNameError) as info:
        catalog.losses.get("ipo")
    assert str(info.value).startswith("unknown loss 'ipo'; installed: ")
    assert "cdpo, cpo, dpo, dpop" in str(info.value)


def test_entry_point_plugin_is_discovered_with_its_distribution(site):
    make_distribution(site, "dpo-fake", "1.2.3", {"fake": "fake_loss"}, {"fake_loss": GOOD_LOSS})
    pm = get_plugin_manager()
    catalog = collect(pm)
    assert catalog.losses.providers["fake-sum"] == "fake"
    assert (pm.sources["fake"].distribution, pm.sources["fake"].version) == ("dpo-fake", "1.2.3")
    assert catalog.registrations["fake"] == {"dpo_register_losses": ["fake-sum"]}


def test_entry_point_plugin_can_be_blocked_by_name(site):
    make_distribution(site, "dpo-fake", "1.0", {"fake": "fake_loss"}, {"fake_loss": GOOD_LOSS})
    pm = get_plugin_manager(environ={"DPO_DISABLE_PLUGINS": "fake"})
    assert "fake-sum" not in collect(pm).losses.names()
    assert not pm.failures


def test_plugin_that_raises_on_import_is_reported_and_the_rest_work(site):
    make_distribution(site, "dpo-broken", "0.1", {"broken": "broken_mod", "fake": "fake_loss"},
                      {"broken_mod": "raise RuntimeError('no GPU driver found')",
                       "fake_loss": GOOD_LOSS})
    pm = get_plugin_manager()
    [failure] = pm.failures
    assert failure.name == "broken" and failure.distribution == "dpo-broken"
    assert failure.error == "RuntimeError: no GPU driver found"
    catalog = collect(pm)
    assert {"dpo", "fake-sum"} <= set(catalog.losses.names())


def test_misspelt_hook_is_a_failure_naming_the_hook(site):
    make_distribution(site, "dpo-typo", "0.1", {"typo": "typo_mod"}, {"typo_mod": """
        import dpo

        @dpo.hookimpl
        def dpo_register_loss(register):
            pass
    """})
    pm = get_plugin_manager()
    [failure] = pm.failures
    assert failure.name == "typo" and "unknown hook 'dpo_register_loss'" in failure.error
    assert not pm.has_plugin("typo")


def test_registration_hook_that_raises_withdraws_that_plugin_only():
    class HalfBroken:
        @dpo.hookimpl
        def dpo_register_losses(self, register):
            register(type("Ok", (dpo.Loss,), {"name": "half-ok", "__call__": lambda s, l: None}))
            raise ValueError("second class failed")

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, HalfBroken(), "half")
    catalog = collect(pm)
    assert "half-ok" not in catalog.losses.names() and "dpo" in catalog.losses.names()
    assert [(f.name, f.error) for f in pm.failures] == [("half", "ValueError: second class failed")]


def test_registering_a_non_subclass_is_a_failure():
    class Wrong:
        @dpo.hookimpl
        def dpo_register_losses(self, register):
            register(dict)

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, Wrong(), "wrong")
    collect(pm)
    [failure] = pm.failures
    assert failure.name == "wrong" and "not a subclass of dpo.core.interfaces.loss.Loss" in failure.error


def test_duplicate_names_are_an_error_naming_both_plugins(site):
    make_distribution(site, "dpo-dup", "0.1", {"dup": "dup_mod"}, {"dup_mod": """
        import dpo
        from dpo.plugins.losses.dpo import DPOLoss

        class Mine(DPOLoss):
            name = "dpo"

        @dpo.hookimpl
        def dpo_register_losses(register):
            register(Mine)
    """})
    catalog = collect(get_plugin_manager())
    with pytest.raises(DuplicateNameError) as info:
        catalog.losses.get("dpo")
    message = str(info.value)
    assert "'dup'" in message and "'dpo.plugins.losses.dpo'" in message
    assert catalog.losses.get("ipo")  # everything else keeps working


def test_every_hook_is_documented_and_exercised_by_a_test():
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("dpo_")]
    assert set(specs) == {"dpo_register_backends", "dpo_register_losses",
                          "dpo_register_stopping_policies", "dpo_register_data_formats",
                          "dpo_register_loggers", "dpo_register_commands"}
    tests = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for name in specs:
        assert len(inspect.getdoc(getattr(hookspecs, name)) or "") > 40, name
        # Each hook is implemented by a plugin defined in some test module.
        assert f"def {name}(" in tests, f"no test implements {name}"


# -- a failed plugin registers nothing ----------------------------------------------------------

def _loss(name: str) -> type:
    from dpo.plugins.losses.dpo import DPOLoss

    return type(f"Loss_{name}", (DPOLoss,), {"name": name})


def _pairs(path: Path) -> Path:
    path.write_text("".join(f'{{"prompt": "{i} + 1 = ", "chosen": "{i + 1}", "rejected": '
                            f'"{i + 2}"}}\n' for i in range(4)))
    return path


def _cli(pm_or_app, *args: str):
    from typer.testing import CliRunner

    from dpo.cli import make_app

    app = make_app(pm_or_app) if isinstance(pm_or_app, DpoPluginManager) else pm_or_app
    return CliRunner().invoke(app, list(args))


def _one_error_line(result, code: int) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


class CommandHookFails:
    """Registers a loss and a stopping policy, then its command hook adds one command and
    raises: the whole plugin must be gone."""

    @dpo.hookimpl
    def dpo_register_losses(self, register):
        register(_loss("half-loss"))

    @dpo.hookimpl
    def dpo_register_commands(self, app):
        @app.command("half-command")
        def half_command() -> None:
            """Never reachable."""

        raise RuntimeError("needs typer 9")


def test_a_plugin_whose_command_hook_raises_registers_nothing(tmp_path):
    from dpo.cli import make_app

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, CommandHookFails(), "cmdfail")
    app = make_app(pm)
    report = json.loads(_cli(app, "plugins", "--json").output)
    assert [(f["name"], f["error"]) for f in report["failed"]] == [
        ("cmdfail", "RuntimeError: needs typer 9")]
    assert "cmdfail" not in {p["name"] for p in report["plugins"]}

    out = tmp_path / "out"
    result = _cli(app, "run", "--model", "tiny", "--data", str(_pairs(tmp_path / "p.jsonl")),
                  "--loss", "half-loss", "--output", str(out), "--no-progress")
    line = _one_error_line(result, 2)
    assert line == ("error: loss 'half-loss' comes from plugin 'cmdfail', which failed "
                    "(RuntimeError: needs typer 9); fix or uninstall it, see `dpo plugins`")
    assert not out.exists()
    assert _cli(app, "half-command").exit_code == 2  # no such command


def test_a_plugin_failing_at_a_later_registration_hook_loses_its_earlier_classes():
    """Backends are collected before losses: the backend registered first must go too."""
    from dpo.backends.cpu import CPUBackend

    class LateFailure:
        @dpo.hookimpl
        def dpo_register_backends(self, register):
            register(type("Mine", (CPUBackend,), {"name": "late-cpu"}))

        @dpo.hookimpl
        def dpo_register_losses(self, register):
            raise ImportError("no module named 'flash'")

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, LateFailure(), "late")
    catalog = collect(pm)
    assert "late-cpu" not in catalog.backends and "late" not in catalog.registrations
    with pytest.raises(dpo.UsageError, match="backend 'late-cpu' comes from plugin 'late', "
                                             "which failed .ImportError: no module named 'flash'."):
        catalog.backends.get("late-cpu")


def test_a_failed_plugin_leaves_no_clash_behind():
    """Its claim on the built-in ``dpo`` goes with it: the name is plain ``dpo`` again."""

    class Claims:
        @dpo.hookimpl
        def dpo_register_losses(self, register):
            register(_loss("dpo"))

        @dpo.hookimpl
        def dpo_register_commands(self, app):
            raise ValueError("broken")

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, Claims(), "claims")
    report = json.loads(_cli(pm, "plugins", "--json").output)
    assert report["conflicts"] == [] and [f["name"] for f in report["failed"]] == ["claims"]


# -- a plugin claiming a built-in name ------------------------------------------------------------

class ClaimsBuiltins:
    """A third party registering the built-in names ``cpu`` (backend) and ``dpo`` (loss)."""

    @dpo.hookimpl
    def dpo_register_backends(self, register):
        from dpo.backends.cpu import CPUBackend

        register(type("OtherCPU", (CPUBackend,), {"name": "cpu"}))

    @dpo.hookimpl
    def dpo_register_losses(self, register):
        register(_loss("dpo"))


def _claiming_manager():
    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, ClaimsBuiltins(), "claimer")
    return pm


def test_a_clash_is_an_error_when_named_and_the_builtin_when_not():
    catalog = collect(_claiming_manager())
    warnings: list[str] = []
    catalog.backends.warn = warnings.append
    with pytest.raises(DuplicateNameError) as info:
        catalog.backends.get("cpu")
    assert "'dpo.backends.cpu'" in str(info.value) and "'claimer'" in str(info.value)
    from dpo.backends.cpu import CPUBackend

    assert catalog.backends.get("cpu", asked=False) is CPUBackend
    assert catalog.backends.get("cpu", asked=False) is CPUBackend
    assert warnings == [  # once
        "backend 'cpu' is also registered by plugin 'claimer'; using the built-in one, since "
        "nothing named it (naming it is an error while both are installed; see `dpo plugins`)"]
    assert catalog.backends.providers["cpu"] == "dpo.backends.cpu"


def test_a_clash_between_two_third_parties_has_no_default():
    class One:
        @dpo.hookimpl
        def dpo_register_losses(self, register):
            register(_loss("shared"))

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, One(), "one")
    register_plugin(pm, One(), "two")
    catalog = collect(pm)
    with pytest.raises(DuplicateNameError) as info:
        catalog.losses.get("shared", asked=False)
    assert "'one'" in str(info.value) and "'two'" in str(info.value)
    assert "shared" not in dict(catalog.losses)  # detection-style iteration skips it
    [clash] = catalog.conflicts
    assert str(clash).endswith("; it cannot be used until one is removed")


def test_a_plain_run_uses_the_builtins_and_says_so(tmp_path):
    """No --backend, no --loss: ``auto`` picks cpu and the default loss is dpo; both clash, the
    built-ins serve, and one warning line each says which plugin was passed over."""
    out = tmp_path / "out"
    result = _cli(_claiming_manager(), "run", "--model", "tiny", "--data",
                  str(_pairs(tmp_path / "p.jsonl")), "--max-steps", "1", "--output", str(out),
                  "--no-progress")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: backend 'cpu' is also registered by plugin 'claimer'" in text
    assert "warning: loss 'dpo' is also registered by plugin 'claimer'" in text
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("flag, kind, name", [("--backend", "backend", "cpu"),
                                              ("--loss", "loss", "dpo")])
def test_naming_a_clashing_name_is_one_line_naming_both_plugins(tmp_path, flag, kind, name):
    """With ``--loss dpo``, ``--backend auto`` still picks the built-in cpu (a warning line
    first); the named loss is the one error."""
    out = tmp_path / "out"
    result = _cli(_claiming_manager(), "run", "--model", "tiny", "--data",
                  str(_pairs(tmp_path / "p.jsonl")), flag, name, "--output", str(out))
    assert result.exit_code == 1 and "Traceback" not in result.output
    *warned, line = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("error: ") and all(w.startswith("warning: ") for w in warned)
    assert f"{kind} {name!r} is registered twice" in line
    assert f"'dpo.backends.{name}'" in line or "'dpo.plugins.losses.dpo'" in line
    assert "'claimer'" in line and not out.exists()


def test_dpo_backends_and_dpo_plugins_show_the_clash():
    pm = _claiming_manager()
    rows = [r for r in json.loads(_cli(pm, "backends", "--json").output) if r["name"] == "cpu"]
    assert [r["plugin"] for r in rows] == ["dpo.backends.cpu", "claimer"]  # built-in first
    notes = {r["plugin"]: r["clash"] for r in rows}
    assert notes["dpo.backends.cpu"].endswith("--backend auto uses this one")
    assert notes["claimer"].endswith("not used")
    lines = _cli(pm, "backends").output.splitlines()
    assert any("cpu (claimer)" in line for line in lines)
    assert [line for line in lines if line.startswith("clash: ")] == [
        "clash: backend 'cpu' is registered twice: by plugin 'dpo.backends.cpu' and by plugin "
        "'claimer'; uninstall one or block it with DPO_DISABLE_PLUGINS; unless named, the "
        "built-in one (plugin 'dpo.backends.cpu') is used"]
    report = json.loads(_cli(pm, "plugins", "--json").output)
    assert any(c.startswith("loss 'dpo' is registered twice") for c in report["conflicts"])
    assert not report["failed"]


def test_format_detection_passes_over_a_clashing_format_for_the_builtin(tmp_path):
    """A third party's ``preference`` parses every record as ("X", "X", "Y"): detection must use
    the built-in one (the pair as written), and ``--format preference`` must refuse."""
    from dpo.core.data.reading import load_pairs
    from dpo.plugins.formats.preference import PreferenceFormat

    class Shadow(PreferenceFormat):
        def parse(self, record):
            return dpo.PreferencePair("X", "X", "Y")

    class Plugin:
        @dpo.hookimpl
        def dpo_register_data_formats(self, register):
            register(Shadow)

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, Plugin(), "shadow")
    formats = collect(pm).formats
    warned: list[str] = []
    formats.warn = warned.append
    path = _pairs(tmp_path / "p.jsonl")
    assert load_pairs(path, formats)[0].pair == dpo.PreferencePair("0 + 1 = ", "1", "2")
    assert warned and warned[0].startswith("data format 'preference' is also registered by "
                                           "plugin 'shadow'")
    with pytest.raises(DuplicateNameError, match="'dpo.plugins.formats.preference'.*'shadow'"):
        load_pairs(path, formats, "preference")


def test_plugin_of_registers_each_class_through_its_kinds_hook(dpo_register, dpo_plugin_manager):
    """A loss and a stopping policy in one call: each lands in its own registry, under the
    plugin's name; a class of no plugin kind is refused when the plugin is built."""
    from dpo.testing import plugin_of

    class Halve(dpo.Loss):
        name = "halve"

        def __call__(self, logps):
            raise AssertionError

    class Never(dpo.StoppingPolicy):
        name = "never"

    dpo_register(plugin_of(Halve, Never), name="two-kinds")
    catalog = collect(dpo_plugin_manager)
    assert catalog.losses.get("halve") is Halve and catalog.stopping.get("never") is Never
    assert "halve" not in catalog.stopping and "never" not in catalog.losses
    with pytest.raises(TypeError, match="is not a Backend, Loss, StoppingPolicy, DataFormat or Logger"):
        plugin_of(Halve, dict)


# -- loggers --------------------------------------------------------------------------------------

def test_a_logger_plugin_is_registered_listed_and_selected_by_log_to(tmp_path):
    """A third-party logger goes through ``dpo_register_loggers`` like the built-ins: listed
    by ``dpo plugins``, selected by ``--log-to``; a clash with a built-in name is refused when
    named; a registered class that is no ``dpo.Logger`` makes the plugin fail."""
    from dpo.testing import plugin_of

    seen: list[int] = []

    class Steps(dpo.Logger):
        name = "steps"

        def log_metrics(self, step, metrics):
            seen.append(step)

    class Shadow(dpo.Logger):
        name = "tensorboard"

    class Plugin:
        @dpo.hookimpl
        def dpo_register_loggers(self, register):
            register(Steps)

    class Wrong:
        @dpo.hookimpl
        def dpo_register_loggers(self, register):
            register(dict)

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, Plugin(), "steps-plugin")
    register_plugin(pm, Wrong(), "wrong")
    register_plugin(pm, plugin_of(Shadow), "shadow")
    catalog = collect(pm)
    assert catalog.loggers.get("steps") is Steps
    assert [f.name for f in pm.failures] == ["wrong"] and "not a subclass of dpo.core." \
        "interfaces.logger.Logger" in pm.failures[0].error
    listed = _cli(pm, "plugins")
    assert listed.exit_code == 0 and "loggers: steps" in listed.output
    data = _pairs(tmp_path / "p.jsonl")
    out = tmp_path / "out"
    result = _cli(pm, "run", "--no-progress", "--model", "tiny", "--data", str(data),
                  "--max-steps", "2", "--batch-size", "2", "--output", str(out),
                  "--log-to", "steps")
    assert result.exit_code == 0, result.output
    assert seen == [1, 2]
    clash = _cli(pm, "run", "--data", str(data), "--output", str(tmp_path / "o2"),
                 "--log-to", "tensorboard")
    assert clash.exit_code != 0 and "'dpo.plugins.loggers.tensorboard'" in clash.output \
        and "'shadow'" in clash.output
