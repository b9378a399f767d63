"""Typed per-plugin options: ``-o key=value`` on the command line, tables in a TOML file.

Every pluggable class (loss, stopping policy, data format) declares a nested pydantic model
``Options`` with typed defaults. Values arrive as strings from the command line or as TOML values
and are validated here; a wrong key or value becomes one line naming the plugin, the key and the
valid choices.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from dpo.core.interfaces.errors import UsageError


class PluginOptions(BaseModel):
    """Base for the ``Options`` model of every plugin: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Configurable:
    """Mixin: a class with a ``name`` and an ``Options`` model."""

    name: ClassVar[str]
    kind: ClassVar[str] = "plugin"
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions | None = None, **values: Any):
        if options is not None and values:
            raise TypeError("pass either an Options instance or keyword values, not both")
        self.options = options if options is not None else self.parse_options(values)

    @classmethod
    def parse_options(cls, values: dict[str, Any]) -> PluginOptions:
        """Validate raw values (strings from ``-o`` or TOML values) into ``cls.Options``."""
        fields = cls.Options.model_fields
        for key in values:
            if key not in fields:
                valid = ", ".join(sorted(fields)) or "none"
                raise UsageError(f"{cls.kind} {cls.name!r}: unknown option {key!r} (valid: {valid})")
        try:
            return cls.Options.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            if not err["loc"]:  # a check of several options together (a model validator)
                raise UsageError(f"{cls.kind} {cls.name!r}: {err['msg']}") from None
            key = ".".join(str(p) for p in err["loc"]) or "options"
            given = values.get(err["loc"][0]) if err["loc"] else None
            shown = f"={given}" if given is not None else ""
            raise UsageError(f"{cls.kind} {cls.name!r}: option {key}{shown}: {err['msg']}") from None

    @classmethod
    def describe_options(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, description) for each option, for help and docs."""
        rows = []
        for key, field in cls.Options.model_fields.items():
            annotation = getattr(field.annotation, "__name__", str(field.annotation))
            rows.append((key, annotation, field.default, field.description or ""))
        return rows


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """``["beta=0.2", "nan-guard.check_grad=false"]`` -> ``{"beta": "0.2", ...}``."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"option {pair!r} is not key=value (e.g. -o beta=0.1)")
        out[key.strip()] = value.strip()
    return out
