"""The plugin manager factory and the catalog of what plugins registered.

Built-in plugins are registered from ``DEFAULT_PLUGINS`` exactly as third-party ones are, so a
built-in can be blocked (``DPO_DISABLE_PLUGINS``) like any other. A third-party plugin that fails
to import, register or validate is recorded with the reason and skipped; the rest keep working.

A plugin that fails at any hook (a registration hook here, ``dpo_register_commands`` in
``dpo.cli.make_app``) registers nothing at all: ``Catalog.withdraw`` takes back every class it
registered, and asking for one of its names says that the plugin failed.

A name that two plugins register (a clash) is kept with both claims and shown by ``dpo plugins``
and ``dpo backends``. Naming it (``--loss``, ``--backend``, ``--stop``, ``--format``, a config
file) is an error naming both plugins; where dpo picks the name itself (the default loss ``dpo``,
the default stopping policy ``nan-guard``, the candidates of ``--backend auto``, format
detection) the built-in claim wins, with a warning line. See ``dpo.core.interfaces.registry``.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from dpo import __version__
from dpo.core.interfaces import hookspecs
from dpo.core.interfaces.backend import Backend
from dpo.core.interfaces.data_format import DataFormat
from dpo.core.interfaces.logger import Logger
from dpo.core.interfaces.loss import Loss
from dpo.core.interfaces.registry import Clash, Registry
from dpo.core.interfaces.stopping import StoppingPolicy

ENTRY_POINT_GROUP = hookspecs.PROJECT
DISABLE_ENV = "DPO_DISABLE_PLUGINS"
DISTRIBUTION = "dpo-trainer"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "dpo.backends.cpu",
    "dpo.backends.cuda",
    "dpo.backends.rocm",
    "dpo.backends.xpu",
    "dpo.backends.xla",
    "dpo.plugins.losses.dpo",
    "dpo.plugins.losses.ipo",
    "dpo.plugins.losses.hinge",
    "dpo.plugins.losses.exo",
    "dpo.plugins.losses.nca",
    "dpo.plugins.losses.sppo",
    "dpo.plugins.losses.apo",
    "dpo.plugins.losses.dpop",
    "dpo.plugins.losses.rpo",
    "dpo.plugins.losses.simpo",
    "dpo.plugins.losses.cpo",
    "dpo.plugins.losses.orpo",
    "dpo.plugins.losses.sft",
    "dpo.plugins.losses.kto",
    "dpo.plugins.losses.bco",
    "dpo.plugins.stopping.nan_guard",
    "dpo.plugins.stopping.early_stopping",
    "dpo.plugins.stopping.target",
    "dpo.plugins.stopping.likelihood_guard",
    "dpo.plugins.stopping.plateau",
    "dpo.plugins.stopping.budget",
    "dpo.plugins.stopping.margin_guard",
    "dpo.plugins.formats.chat",
    "dpo.plugins.formats.hh",
    "dpo.plugins.formats.messages",
    "dpo.plugins.formats.preference",
    "dpo.plugins.formats.prompt_completion",
    "dpo.plugins.formats.unpaired",
    "dpo.plugins.loggers.tensorboard",
    "dpo.plugins.loggers.wandb",
    "dpo.plugins.loggers.mlflow",
)

# hook name -> (registry kind, base class); the order is the order of ``dpo plugins`` columns.
REGISTRATION_HOOKS: dict[str, tuple[str, type]] = {
    "dpo_register_backends": ("backend", Backend),
    "dpo_register_losses": ("loss", Loss),
    "dpo_register_stopping_policies": ("stopping policy", StoppingPolicy),
    "dpo_register_data_formats": ("data format", DataFormat),
    "dpo_register_loggers": ("logger", Logger),
}


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin came from."""

    name: str
    distribution: str
    version: str
    builtin: bool


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used, and why (one line)."""

    name: str
    distribution: str
    version: str
    error: str


class DpoPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers plugin provenance and failures."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.sources: dict[str, PluginSource] = {}
        self.failures: list[PluginFailure] = []

    def fail(self, name: str, error: BaseException | str) -> PluginFailure:
        """Record ``name`` as failed and unregister it if it got registered."""
        source = self.sources.pop(name, None)
        dist = source.distribution if source else "?"
        version = source.version if source else "?"
        if self.has_plugin(name):
            self.unregister(name=name)
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        failure = PluginFailure(name, dist, version, " ".join(str(text).split()))
        self.failures.append(failure)
        return failure


def disabled_plugins(environ: dict[str, str] | None = None) -> list[str]:
    """Names listed in ``DPO_DISABLE_PLUGINS`` (comma or whitespace separated)."""
    raw = (environ if environ is not None else os.environ).get(DISABLE_ENV, "")
    return [n for n in raw.replace(",", " ").split() if n]


def get_plugin_manager(
    *,
    load_entrypoints: bool = True,
    defaults: Iterable[str] = DEFAULT_PLUGINS,
    environ: dict[str, str] | None = None,
) -> DpoPluginManager:
    """A fresh plugin manager: hookspecs, blocked names, the ``dpo`` entry points, the built-ins,
    then validation. Calling it has no effect on any other manager."""
    pm = DpoPluginManager()
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins(environ):
        pm.set_blocked(name)
    if load_entrypoints:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            _register_entry_point(pm, ep)
    for module_name in defaults:
        if pm.is_blocked(module_name):
            continue
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        pm.sources[module_name] = PluginSource(module_name, DISTRIBUTION, __version__, True)
    return pm


def _register_entry_point(pm: DpoPluginManager, ep: metadata.EntryPoint) -> None:
    dist = ep.dist.name if ep.dist else "?"
    version = ep.dist.version if ep.dist else "?"
    if pm.is_blocked(ep.name):
        return
    pm.sources[ep.name] = PluginSource(ep.name, dist, version, False)
    try:
        plugin = ep.load()
        if pm.has_plugin(ep.name):
            raise ValueError(f"a plugin named {ep.name!r} is already registered")
        pm.register(plugin, name=ep.name)
        _validate(pm, ep.name)
    except Exception as exc:  # a broken third-party plugin must not break the others
        pm.fail(ep.name, exc)


def register_plugin(pm: DpoPluginManager, plugin: Any, name: str, distribution: str = "?",
                    version: str = "?") -> None:
    """Register an object or module as a plugin by hand (tests, notebooks, embedding)."""
    pm.sources[name] = PluginSource(name, distribution, version, False)
    pm.register(plugin, name=name)
    _validate(pm, name)


def _validate(pm: DpoPluginManager, name: str) -> None:
    """Refuse ``dpo_*`` functions that match no hook (usually a typo in a hook name)."""
    plugin = pm.get_plugin(name)
    for attr in dir(plugin):
        if attr.startswith("dpo_") and attr not in pm.hook.__dict__.keys() - _unspecified(pm):
            if callable(getattr(plugin, attr, None)) and pm.parse_hookimpl_opts(plugin, attr):
                known = ", ".join(sorted(REGISTRATION_HOOKS) + ["dpo_register_commands"])
                raise ValueError(f"implements unknown hook {attr!r} (known: {known})")


def _unspecified(pm: DpoPluginManager) -> set[str]:
    return {n for n, caller in pm.hook.__dict__.items() if not caller.has_spec()}


def hook_impls(pm: DpoPluginManager, hook_name: str) -> list[pluggy.HookImpl]:
    """The implementations of ``hook_name`` in registration order (pluggy keeps them LIFO), so
    callers can attribute results and failures to one plugin."""
    return list(reversed(getattr(pm.hook, hook_name).get_hookimpls()))


def call_impl(impl: pluggy.HookImpl, **kwargs: Any) -> Any:
    """Call one hook implementation with the arguments it asks for, as pluggy would."""
    return impl.function(**{a: kwargs[a] for a in impl.argnames})


@dataclass
class Catalog:
    """Everything the plugins registered, keyed by name, with provenance."""

    backends: Registry[Backend]
    losses: Registry[Loss]
    stopping: Registry[StoppingPolicy]
    formats: Registry[DataFormat]
    loggers: Registry[Logger]
    registrations: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def registry(self, hook_name: str) -> Registry:
        return {
            "dpo_register_backends": self.backends,
            "dpo_register_losses": self.losses,
            "dpo_register_stopping_policies": self.stopping,
            "dpo_register_data_formats": self.formats,
            "dpo_register_loggers": self.loggers,
        }[hook_name]

    @property
    def conflicts(self) -> list[Clash]:
        """Every name that several plugins register, in ``REGISTRATION_HOOKS`` order."""
        return [c for hook_name in REGISTRATION_HOOKS for c in self.registry(hook_name).clashes()]

    def withdraw(self, plugin_name: str, why: str) -> None:
        """Take back everything ``plugin_name`` registered (it failed at some hook)."""
        self.registrations.pop(plugin_name, None)
        for hook_name in REGISTRATION_HOOKS:
            self.registry(hook_name).withdraw(plugin_name, why)


def collect(pm: DpoPluginManager) -> Catalog:
    """Call every registration hook once per plugin and gather the classes.

    A plugin whose hook raises is recorded as failed and everything it registered, at this hook
    or an earlier one, is withdrawn. A name that two plugins register is kept with both claims
    (``Registry``): naming it is an error that names both, everything else keeps working.
    """
    catalog = Catalog(*(Registry(kind, base) for kind, base in REGISTRATION_HOOKS.values()))
    for hook_name in REGISTRATION_HOOKS:
        registry = catalog.registry(hook_name)
        for impl in hook_impls(pm, hook_name):
            plugin_name = impl.plugin_name
            source = pm.sources.get(plugin_name)
            added: list[str] = []

            def register(cls: type, _plugin: str = plugin_name, _added: list = added,
                         _builtin: bool = bool(source and source.builtin)) -> None:
                registry.add(cls, provider=_plugin, builtin=_builtin)
                _added.append(cls.name)

            try:
                call_impl(impl, register=register)
            except Exception as exc:
                failure = pm.fail(plugin_name, exc)
                catalog.withdraw(plugin_name, failure.error)
                continue
            if added:
                catalog.registrations.setdefault(plugin_name, {})[hook_name] = added
    return catalog
