"""``dpo backends``: every hardware backend and whether it can run here."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from dpo.core.interfaces.plugins import Catalog
from dpo.core.interfaces.registry import Clash
from dpo.core.training.report import log_console


def backend_rows(catalog: Catalog) -> list[dict]:
    """One row per backend class, so a name that two plugins register shows both (``clash``
    says what the name means then; empty for every other row)."""
    clashes = {c.name: c for c in catalog.backends.clashes()}
    rows = []
    for name in catalog.backends.names():
        for claim in catalog.backends.claims[name]:
            cls = claim.cls
            try:
                reason = cls.unavailable_reason()
            except Exception as exc:  # a third-party probe must not take the listing down
                reason = f"its availability probe failed: {type(exc).__name__}: {exc}"
            backend = cls() if reason is None else None
            clash = clashes.get(name)
            rows.append({
                "name": name,
                "available": reason is None,
                "devices": cls.device_count() if reason is None else 0,
                "collective": cls.collective,
                # What --dtype auto picks, and the device(s) as the run's log will name them.
                "dtype": str(backend.default_dtype()).removeprefix("torch.") if backend else "",
                "device": backend.describe() if backend else "",
                "reason": reason or "",
                "plugin": claim.provider,
                "clash": _clash_note(clash, claim.provider) if clash else "",
            })
    return rows


def _clash_note(clash: Clash, provider: str) -> str:
    others = " and ".join(repr(p) for p in clash.providers if p != provider)
    if clash.builtin == provider:
        return (f"also registered by plugin {others}: --backend {clash.name} is an error; "
                "--backend auto uses this one")
    return f"also registered by plugin {others}: --backend {clash.name} is an error; not used"


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
            table.add_column(column, no_wrap=column == "backend")
        for r in rows:
            # A clashing name gets one row per plugin, each saying whose it is.
            name = f"{r['name']} ({r['plugin']})" if r["clash"] else r["name"]
            table.add_row(name, "yes" if r["available"] else "no", str(r["devices"]),
                          r["collective"], r["dtype"], r["device"] or r["reason"])
        console = log_console(stderr=False)
        console.print(table)
        for c in catalog.backends.clashes():
            console.print(f"clash: {c}", markup=False, highlight=False, soft_wrap=True)
