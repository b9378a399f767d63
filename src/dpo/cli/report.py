"""``dpo report``: figures, a side-by-side table and one self-contained HTML page from runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dpo.cli.common import one_line_errors
from dpo.core.interfaces.plugins import Catalog


def terminal_table(runs: list[Any], rows: list[Any]) -> Any:
    """The table as rich draws it: a column per run, a section per group of rows."""
    from rich.table import Table

    from dpo.report.summary import cell

    table = Table(title="runs side by side", title_justify="left")
    table.add_column("", no_wrap=True)
    for run in runs:
        table.add_column(run.name, justify="right", overflow="fold")
    group = None
    for row in rows:
        if row.group != group:
            if group is not None:
                table.add_section()
            group = row.group
            table.add_row(f"[bold]{group}[/]", *[""] * len(runs))
        table.add_row(f"  {row.name}", *[cell(v) for v in row.values])
    return table


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("report")
    @one_line_errors
    def report_command(
        runs: Annotated[list[Path], typer.Argument(help="Run directories (each holds run.json), or a sweep directory (its runs are the subdirectories that hold one).", show_default=False)],
        output: Annotated[Optional[Path], typer.Option("--output", help="Where to write the report (default: report/ in the first run's directory).")] = None,
    ) -> None:
        """Plot runs against the step (loss, rewards, log-probs, gradient norm, learning rate,
        throughput, memory; evaluations and downstream scores beside training; the early-stop
        and best steps marked), print their settings and metrics side by side, and write PNGs,
        report.json and one self-contained report.html. Needs the report extra (matplotlib)."""
        from rich.console import Console

        from dpo.report import PAGE, make_report

        report = make_report(runs, output)
        console = Console(highlight=False)
        console.print(terminal_table(report.runs, report.rows))
        for note in report.notes:
            console.print(f"note: {note}", markup=False)
        console.print(f"wrote {len(report.figures)} figures, {PAGE} and report.json -> "
                      f"{report.output}", markup=False)
