"""``dpo plugins``: what is loaded, from where, what it registers, and what failed."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from dpo.core.interfaces.plugins import REGISTRATION_HOOKS, Catalog, DpoPluginManager
from dpo.core.training.report import log_console


def plugin_report(pm: DpoPluginManager, catalog: Catalog, commands: dict[str, list[str]]) -> dict:
    loaded = []
    for name, source in pm.sources.items():
        if not pm.has_plugin(name):
            continue
        hooks = dict(catalog.registrations.get(name, {}))
        if name in commands:
            hooks["dpo_register_commands"] = commands[name]
        loaded.append({"name": name, "distribution": source.distribution, "version": source.version,
                       "builtin": source.builtin, "hooks": hooks})
    failed = [{"name": f.name, "distribution": f.distribution, "version": f.version,
               "error": f.error} for f in pm.failures]
    conflicts = [str(c) for c in catalog.conflicts]
    return {"plugins": loaded, "failed": failed, "conflicts": conflicts}


def register(app: typer.Typer, pm: DpoPluginManager, catalog: Catalog,
             commands: dict[str, list[str]]) -> None:
    @app.command("plugins")
    def plugins(
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """List plugins: distribution and version, what each registers, and any that failed."""
        report = plugin_report(pm, catalog, commands)
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        console = log_console(stderr=False)
        table = Table(title="plugins")
        table.add_column("plugin", no_wrap=True)
        table.add_column("distribution", no_wrap=True)
        table.add_column("registers", overflow="fold")
        short = {h: h.removeprefix("dpo_register_").replace("_", " ") for h in
                 [*REGISTRATION_HOOKS, "dpo_register_commands"]}
        for p in report["plugins"]:
            registers = "; ".join(f"{short[h]}: {', '.join(names)}" for h, names in p["hooks"].items())
            table.add_row(p["name"], f"{p['distribution']} {p['version']}", registers or "-")
        console.print(table)
        for f in report["failed"]:
            # Not markup: an error's "[...]" would be eaten.
            console.print(f"failed: {f['name']} ({f['distribution']} {f['version']}): {f['error']}",
                          markup=False, highlight=False,
                          soft_wrap=True)
        for c in report["conflicts"]:
            console.print(f"conflict: {c}", markup=False, highlight=False, soft_wrap=True)
