"""The plugin manager: built-ins as plugins, entry points, blocking, isolation, duplicates."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest

import dpo
from dpo.core import hookspecs
from dpo.core.errors import DuplicateNameError, UnknownNameError
from dpo.core.plugins import DEFAULT_PLUGINS, collect, get_plugin_manager, register_plugin


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
    assert "preference" in catalog.formats.names()


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
    assert "cdpo, dpo" in str(info.value)


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
    assert failure.name == "wrong" and "not a subclass of dpo.core.loss.Loss" in failure.error


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
                          "dpo_register_commands"}
    tests = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for name in specs:
        assert len(inspect.getdoc(getattr(hookspecs, name)) or "") > 40, name
        # Each hook is implemented by a plugin defined in some test module.
        assert f"def {name}(" in tests, f"no test implements {name}"
