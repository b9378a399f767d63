"""``dpo plugins``: what is loaded, from where, what it registers, and what failed."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from rich.table import Table

from dpo.core.interfaces.plugins import REGISTRATION_HOOKS, Catalog, DpoPluginManager
from dpo.core.training.report import log_console


REQUIRED = "<required>"


def option_defaults(cls: type) -> dict[str, Any]:
    """``-o`` key -> default of a registered class's options (``REQUIRED`` where it has none)."""
    options = getattr(cls, "Options", None)
    fields = getattr(options, "model_fields", {})
    return {key: (REQUIRED if field.is_required() else field.get_default(call_default_factory=True))
            for key, field in fields.items()}


def _registered_options(catalog: Catalog, plugin_name: str) -> dict[str, dict[str, dict[str, Any]]]:
    """hook -> registered name -> option defaults, for the classes ``plugin_name`` registered."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for hook_name, names in catalog.registrations.get(plugin_name, {}).items():
        claims = catalog.registry(hook_name).claims
        for name in names:
            cls = next((c.cls for c in claims.get(name, []) if c.provider == plugin_name), None)
            if cls is not None and (defaults := option_defaults(cls)):
                out.setdefault(hook_name, {})[name] = defaults
    return out


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def plugin_report(pm: DpoPluginManager, catalog: Catalog, commands: dict[str, list[str]]) -> dict:
    loaded = []
    for name, source in pm.sources.items():
        if not pm.has_plugin(name):
            continue
        hooks = dict(catalog.registrations.get(name, {}))
        if name in commands:
            hooks["dpo_register_commands"] = commands[name]
        loaded.append({"name": name, "distribution": source.distribution, "version": source.version,
                       "builtin": source.builtin, "hooks": hooks,
                       "options": _registered_options(catalog, name)})
    failed = [{"name": f.name, "distribution": f.distribution, "version": f.version,
               "error": f.error} for f in pm.failures]
    conflicts = [str(c) for c in catalog.conflicts]
    return {"plugins": loaded, "failed": failed, "conflicts": conflicts}


def option_rows(catalog: Catalog) -> list[dict]:
    """Every option of every loss, stopping policy, data format and logger: what ``-o`` takes."""
    rows = []
    for kind, registry in (("loss", catalog.losses), ("stopping policy", catalog.stopping),
                           ("data format", catalog.formats), ("logger", catalog.loggers)):
        for name, cls in registry:
            for key, field in cls.Options.model_fields.items():
                required = field.is_required()
                rows.append({"kind": kind, "name": name, "option": key,
                             "type": type_name(field.annotation), "required": required,
                             "default": (None if required else
                                         field.get_default(call_default_factory=True)),
                             "description": field.description or ""})
    return rows


def type_name(annotation: Any) -> str:
    """``float | None``, ``stop|warn`` (a Literal's choices), ``int``."""
    if get_origin(annotation) is Literal:
        return "|".join(str(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def register(app: typer.Typer, pm: DpoPluginManager, catalog: Catalog,
             commands: dict[str, list[str]]) -> None:
    @app.command("plugins")
    def plugins(
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
        options: Annotated[bool, typer.Option(
            "--options", help="Also list each option's type and description (-o NAME.KEY=VALUE).")] = False,
    ) -> None:
        """List plugins: distribution and version, what each registers (with its -o options and
        their defaults), and any that failed."""
        report = plugin_report(pm, catalog, commands)
        if options:
            report["options"] = option_rows(catalog)
        if as_json:
            typer.echo(json.dumps(report, indent=2, default=str))
            return
        console = log_console(stderr=False)
        table = Table(title="plugins")
        table.add_column("plugin", no_wrap=True)
        table.add_column("distribution", no_wrap=True)
        table.add_column("registers", overflow="fold")
        short = {h: h.removeprefix("dpo_register_").replace("_", " ") for h in
                 [*REGISTRATION_HOOKS, "dpo_register_commands"]}
        for p in report["plugins"]:
            def named(hook: str, name: str, _options: dict = p["options"]) -> str:
                defaults = _options.get(hook, {}).get(name)
                if not defaults:
                    return name
                return f"{name} ({', '.join(f'{k}={_shown(v)}' for k, v in defaults.items())})"

            registers = "; ".join(f"{short[h]}: {', '.join(named(h, n) for n in names)}"
                                  for h, names in p["hooks"].items())
            table.add_row(p["name"], f"{p['distribution']} {p['version']}", registers or "-")
        console.print(table)
        for f in report["failed"]:
            # Not markup: an error's "[...]" would be eaten.
            console.print(f"failed: {f['name']} ({f['distribution']} {f['version']}): {f['error']}",
                          markup=False, highlight=False,
                          soft_wrap=True)
        for c in report["conflicts"]:
            console.print(f"conflict: {c}", markup=False, highlight=False, soft_wrap=True)
        if options:
            console.print(options_table(report["options"]))


def options_table(rows: list[dict]) -> Table:
    table = Table(title="options")
    for column in ("kind", "name", "option", "type", "default", "description"):
        table.add_column(column, overflow="fold", no_wrap=column in ("name", "option"))
    for row in rows:
        default = "(required)" if row["required"] else str(row["default"])
        table.add_row(row["kind"], row["name"], row["option"], row["type"], default,
                      row["description"])
    return table
