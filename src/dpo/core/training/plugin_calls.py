"""Calling a plugin's code from the run: whatever it raises becomes one line naming it."""

from __future__ import annotations

from typing import Any, Callable

from dpo.core.interfaces.errors import DpoError, first_line


class PluginError(DpoError):
    """A plugin's code raised while the run used it."""


def plugin_call(plugin: Any, what: str, call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)``; an exception other than dpo's own errors becomes one line naming the
    plugin (the run's record says so too), not a traceback from inside the loop."""
    try:
        return call(*args)
    except DpoError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of third-party code
        detail = first_line(exc, fallback="")
        raise PluginError(f"{plugin.kind} {plugin.name!r} raised {type(exc).__name__} in "
                          f"{what}{': ' + detail if detail else ''}; fix the plugin or choose "
                          "another") from exc
