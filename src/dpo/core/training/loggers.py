"""The run's loggers (``--log-to``): chosen and checked before anything is written, then fed by
the ``Reporter`` on the main process, each one turned off (with one warning) if it raises."""

from __future__ import annotations

from typing import Any, Callable

from dpo.core.interfaces.errors import UnknownNameError, first_line
from dpo.core.interfaces.logger import Logger
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.plugin_calls import plugin_call

# metrics.jsonl, which the Reporter always writes: a name --log-to takes, no plugin.
JSONL = "jsonl"


def resolve_loggers(names: list[str], catalog: Catalog, options: Callable[[str], dict[str, Any]],
                    asked: bool = True) -> list[Logger]:
    """The loggers ``names`` select (``jsonl`` needs none), made with their ``options(name)``.
    An unknown name, a logger whose packages are missing (its extra named) or bad options are
    one-line errors, found before the run writes anything. ``asked``: the user named them."""
    loggers = []
    for name in names:
        if name == JSONL:
            continue
        registry = catalog.loggers
        if name not in registry and name not in registry.withdrawn:
            raise UnknownNameError("logger", name, [JSONL, *registry.names()])
        cls = registry.get(name, asked=asked)
        cls.check()
        loggers.append(plugin_call(cls, "__init__", cls, cls.parse_options(options(name))))
    return loggers


class Loggers:
    """The started loggers of one run. Every call goes to each logger in turn; one that
    raises is reported once through ``warn`` (naming it, the method and the error) and gets no
    further calls."""

    def __init__(self, warn: Callable[[str], None]):
        self.warn = warn
        self.active: list[Logger] = []

    def __bool__(self) -> bool:
        return bool(self.active)

    def call(self, method: str, *args: Any) -> None:
        for logger in list(self.active):
            try:
                getattr(logger, method)(*args)
            except Exception as exc:  # noqa: BLE001 - any failure of a tracker's code
                self.active.remove(logger)
                detail = first_line(exc, fallback="")
                self.warn(f"logger {logger.name!r} raised {type(exc).__name__} in {method}"
                          f"{': ' + detail if detail else ''}; it is turned off, the run goes on")
