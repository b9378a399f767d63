"""``dpo backends``: every hardware backend and whether it can run here."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dpo.core.plugins import Catalog


def backend_rows(catalog: Catalog) -> list[dict]:
    rows = []
    for name, cls in catalog.backends:
        reason = cls.unavailable_reason()
        backend = cls() if reason is None else None
        rows.append({
            "name": name,
            "available": reason is None,
            "devices": cls.device_count() if reason is None else 0,
            "collective": cls.collective,
            # What --dtype auto picks, and the device(s) as the run's log will name them.
            "dtype": str(backend.default_dtype()).removeprefix("torch.") if backend else "",
            "device": backend.describe() if backend else "",
            "reason": reason or "",
            "plugin": catalog.backends.providers[name],
        })
    return rows


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("backends")
    def backends(
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """List hardware backends: available here or not (and why), device count, collective,
        what --dtype auto means, and the device."""
        rows = backend_rows(catalog)
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        table = Table(title="backends")
        for column in ("backend", "available", "devices", "collective", "auto dtype",
                       "device, or why not"):
            table.add_column(column)
        for r in rows:
            table.add_row(r["name"], "yes" if r["available"] else "no", str(r["devices"]),
                          r["collective"], r["dtype"], r["device"] or r["reason"])
        Console().print(table)
