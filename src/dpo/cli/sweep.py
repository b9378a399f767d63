"""``dpo sweep``: train a grid of runs, one ``dpo run`` (or ``dpo sft``) process per point, one
after the other, each in its own run directory under the sweep's; resumable point by point; a
table of every point's held-out metrics at the end (``dpo.core.training.sweep``)."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer
from rich.markup import escape
from rich.table import Table

from dpo.cli.common import one_line_errors
from dpo.cli.run import check_config_file, new_run_config
from dpo.cli.training_options import COMMAND_OF, RUN, SFT, options_of
from dpo.core.interfaces.errors import DpoError, Interrupted, UsageError
from dpo.core.interfaces.options import parse_assignments
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training import rundir
from dpo.core.training import strategy as strat
from dpo.core.training import sweep as sw
from dpo.core.training.combination import (WEIGHTS, loss_names, options_record,
                                            resolve_loss)
from dpo.core.training.config import RunConfig, read_config_file
from dpo.core.training.report import log_console
from dpo.core.training.setup import check_options

# `dpo run` options a sweep decides itself, so that they cannot come after the sweep's own.
_SWEEP_DECIDES = {"--output": "each point's run directory is named after its settings under the "
                              "sweep's --output",
                  "--resume": "a sweep resumes its points itself (dpo sweep --resume SWEEPDIR)",
                  "--overwrite": "a sweep never replaces a run; give a new --output instead"}
_DIFFERS = {"command": "another command", "config": "another base config (--config)",
            "args": "other run options", "grid": "another grid"}
_SWITCH = {"true": True, "on": True, "yes": True, "1": True,
           "false": False, "off": False, "no": False, "0": False}
_HELP = ("Train a grid of runs: every combination of the --grid values, each an ordinary run "
         "directory under --output (e.g. beta=0.05,lr=5e-07), trained one after the other by "
         "its own `dpo run` process (`dpo sft` with --command sft).\n\n"
         "Options after the sweep's own go to every run (e.g. --model tiny --max-steps 20). Run "
         "it again (or --resume SWEEPDIR) to go on after an interruption: finished points are "
         "kept, an interrupted one resumes from its last checkpoint. Writes sweep.json, then "
         "summary.json and summary.csv: each point's final and best held-out metrics.")


@dataclass
class Plan:
    """A sweep as given: its identity (recorded in sweep.json), its points, and each point's
    command line (without its directory)."""

    command: str
    record: dict[str, Any]
    points: list[sw.Point]
    argv: dict[str, list[str]]


def register(app: typer.Typer, catalog: Catalog) -> None:
    @app.command("sweep", help=_HELP,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    @one_line_errors
    def sweep_command(
        ctx: typer.Context,
        grid: Annotated[Optional[list[str]], typer.Option("--grid", help="key=v1,v2,...: an axis of the grid (repeatable; the product of all is swept). Keys: a run option by its config-file name (lr, beta... see `dpo run --help`; aliases: steps, bs, accum, wd, warmup), a loss option (beta) or plugin.key. A list option joins its items with + (stop=nan-guard+early-stopping; loss=dpo+sft,dpo sweeps the losses trained). A loss combination's weights separate one point's items with : (weights=1:0.2,1:0.5 with --loss dpo --loss sft); where the grid varies loss or weights, the summary ranks points by eval/rewards/accuracies, eval/loss being another measure at each.")] = None,
        config: Annotated[Optional[Path], typer.Option("--config", help="The base config file (TOML, as `dpo run --config`) of every point; the grid's values win.")] = None,
        output: Annotated[Optional[Path], typer.Option("--output", help="The sweep directory: sweep.json, one run directory per point, summary.json and summary.csv.")] = None,
        resume: Annotated[Optional[Path], typer.Option("--resume", help="Go on with the sweep in this directory, as its sweep.json records it.")] = None,
        summary: Annotated[Optional[Path], typer.Option("--summary", help="Print the summary table of the sweep in this directory, and run nothing.")] = None,
        command: Annotated[Optional[str], typer.Option("--command", help="run (DPO) or sft. " + escape("[default: sft where the base config sets objective = \"sft\", else run]"))] = None,
        nproc: Annotated[Optional[int], typer.Option("--nproc", help="Train each point in N processes (`dpo run --nproc N`). " + escape("[default: one process]"))] = None,
        fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first point that fails (by default the sweep goes on and its exit status says that one failed).")] = False,
    ) -> None:
        extra = list(ctx.args)
        if summary is not None:
            if grid or config or output or resume or extra:
                raise UsageError("--summary prints a sweep's table and takes nothing else; "
                                 f"drop the other options, e.g. dpo sweep --summary {summary}")
            recorded = sw.read_sweep(summary)
            show(sw.summarise(summary, recorded), recorded)
            return
        if strat.launched_by_torchrun():
            raise UsageError("dpo sweep launches its runs itself; run it without torchrun "
                             "(--nproc N trains each point in N processes)")
        if nproc is not None and nproc < 1:
            raise UsageError(f"--nproc {nproc}: give a number of processes, 1 or more")
        if resume is not None:
            if output is not None:
                raise UsageError("give either --output (a sweep) or --resume (the sweep "
                                 "in that directory), not both")
            if grid or config or extra or command:
                raise UsageError(f"--resume {resume} goes on with the sweep as its "
                                 f"{sw.SWEEP_FILE} records it; drop --grid, --config, --command "
                                 "and run options")
            recorded = sw.read_sweep(resume)
            command = recorded.get("command")
            config = Path(recorded["config"]["path"]) if recorded.get("config") else None
            extra = list(recorded.get("args") or [])
            grid = [f"{axis['key']}={','.join(axis['values'])}" for axis in recorded["grid"]]
            directory, flag = resume, "--resume"
        elif output is None:
            raise UsageError("--output is required: the sweep directory, e.g. --output sweep")
        else:
            directory, flag = output, "--output"
        plan = make_plan(ctx, catalog, command, config, extra, grid or [])
        run_sweep(plan, directory, flag, nproc, fail_fast)


def detect_command(command: str | None, config: Path | None) -> str:
    """The training command of a sweep: --command, else the base config's objective, else run."""
    if command is not None:
        if command not in (RUN, SFT):
            raise UsageError(f"--command {command}: give run (DPO) or sft")
        return command
    if config is not None:
        objective = read_config_file(config).get("objective")
        if objective in COMMAND_OF:
            return COMMAND_OF[objective]
    return RUN


def point_flags(axes: list[sw.Axis], point: sw.Point) -> list[str]:
    """The `dpo run` options that set ``point``'s values."""
    kinds = {option.name: option for option in options_of(RUN) + options_of(SFT)}
    by_key = {axis.key: axis for axis in axes}
    flags: list[str] = []
    for key, value in point.values:
        if not by_key[key].field:
            if key == WEIGHTS:  # one point's weights: 1:0.2 -> -o weights=1,0.2
                value = value.replace(sw.ITEM_SEPARATOR, ",")
            flags += ["-o", f"{key}={value}"]
            continue
        flag = "--" + key.replace("_", "-")
        kind = kinds[key].type if key in kinds else None
        if kind == Optional[bool]:
            if value.lower() not in _SWITCH:
                raise UsageError(f"--grid {key}={value}: {key} is a switch; give true or false")
            flags.append(flag if _SWITCH[value.lower()] else f"--no-{key.replace('_', '-')}")
        elif kind == Optional[list[str]]:
            for item in value.split(sw.LIST_SEPARATOR):
                flags += [flag, item]
        else:
            flags += [flag, value]
    return flags


def parse_values(ctx: typer.Context, command: str, argv: list[str], where: str
                 ) -> dict[str, Any]:
    """``argv`` parsed as `dpo COMMAND` parses it: its options' values, or a one-line error
    that starts with ``where``."""
    group = ctx.parent.command if ctx.parent is not None else None
    run_command = group.commands[command]  # type: ignore[union-attr]
    try:
        parsed = run_command.make_context(command, list(argv), parent=ctx.parent)
    except (click.ClickException, typer.TyperException) as exc:  # a bad value, an unknown option
        raise UsageError(f"{where}: {exc.format_message().rstrip('.')}") from None
    return dict(parsed.params)


def check_point(config: RunConfig, catalog: Catalog) -> dict[str, dict[str, Any]]:
    """The checks `dpo run` makes of a configuration's plugins before it writes anything (the
    options of each plugin it uses, the names of the loss and stopping policies); returns each
    plugin's options, validated and typed."""
    check_options(config, catalog)
    typed: dict[str, dict[str, Any]] = {}
    if config.objective == "dpo":
        typed.update(options_record(resolve_loss(config.loss, config.options, catalog,
                                                 origins=config.file_origins)))
    plugins = [(catalog.stopping, name) for name in config.stop]
    for registry, name in plugins:
        cls = registry.get(name)
        typed[name] = cls.parse_options(config.plugin_options(name)).model_dump(mode="json")
    return typed


def check_grid_weights(point: sw.Point, config: RunConfig) -> None:
    """A point's ``weights`` (a combination's, separated by ``sweep.ITEM_SEPARATOR``) hold one
    weight per loss; a one-line error in the grid's terms otherwise (the weights' own values
    are checked with the loss, as `dpo run` checks them). The caller prefixes the point."""
    given = dict(point.values).get(WEIGHTS)
    names = loss_names(config.loss)
    if given is None or len(names) < 2:
        return
    count = len(given.split(sw.ITEM_SEPARATOR))
    if count != len(names):
        example = sw.ITEM_SEPARATOR.join(["1.0"] * len(names))
        raise UsageError(f"{count} weight(s) for {len(names)} losses "
                         f"({', '.join(names)}); a grid value gives one point's weights, "
                         f"separated by {sw.ITEM_SEPARATOR!r} (e.g. --grid weights={example},"
                         f"{example.replace('1.0', '0.5', 1)})")


def make_plan(ctx: typer.Context, catalog: Catalog, command: str | None, config: Path | None,
              extra: list[str], specs: list[str]) -> Plan:
    """The sweep given: every point's configuration resolved and checked as `dpo run` would
    (before anything is written), or a one-line error."""
    command = detect_command(command, config)
    for word in extra:
        name = word.split("=", 1)[0]
        if name in _SWEEP_DECIDES:
            raise UsageError(f"{word}: {_SWEEP_DECIDES[name]}")
    fields = {option.name for option in options_of(command) if option.is_field}
    axes = sw.parse_grid(specs, fields)
    base = (["--config", str(config)] if config is not None else []) + extra
    # The base alone: its options parse, its config file is one the command takes. (Whether
    # it makes a valid run is asked of each point: a grid may complete it, e.g. lora=true.)
    given = parse_values(ctx, command, base, f"dpo {command} {shlex.join(base)}")
    options = parse_assignments(given["option"] or [])
    for axis in axes:
        if (given.get(axis.key) not in (None, [], ()) if axis.field else axis.key in options):
            shown = f"--{axis.key.replace('_', '-')}" if axis.field else f"-o {axis.key}"
            raise UsageError(f"{shown} is given to every run and is an axis of the grid (--grid "
                             f"{axis.key}=...); give it in one place")
    table = None if config is None else check_config_file(command, read_config_file(config))
    points = sw.expand(axes)
    argv: dict[str, list[str]] = {}
    for point in points:
        flags = point_flags(axes, point)
        where = "--grid " + ",".join(f"{k}={v}" for k, v in point.values)
        values = parse_values(ctx, command, [*base, *flags], where)
        try:
            resolved = new_run_config(command, values)
            check_grid_weights(point, resolved)
            typed = check_point(resolved, catalog)
        except DpoError as exc:
            raise UsageError(f"{where}: {exc}") from None
        dumped = resolved.model_dump(mode="json")
        for key, value in point.values:
            axis = next(a for a in axes if a.key == key)
            if axis.field:
                point.settings[key] = dumped[key]
            else:
                plugin, _, option = key.rpartition(".")
                plugin = plugin or resolved.loss
                # A combination's plain key is its parts' options: the first part's that has it.
                owner = next((p for p in [plugin, *loss_names(resolved.loss)]
                              if option in typed.get(p, {})), plugin)
                point.settings[key] = typed.get(owner, {}).get(
                    option, resolved.options.get(plugin, {}).get(option, value))
        argv[point.name] = [*base, *flags]
    record = {
        "kind": sw.KIND, "command": command,
        "config": None if config is None else {"path": str(Path(config).resolve()),
                                               "table": dict(table or {})},
        "args": extra, "grid": [axis.as_record() for axis in axes],
    }
    return Plan(command, record, points, argv)


def claim(directory: Path, flag: str, plan: Plan) -> dict[str, Any]:
    """The sweep's record in ``directory``: the one there if it is this sweep's (else a one-line
    error), or a new one for a directory that is new or empty. Writes nothing."""
    rundir.check_output(directory, flag)
    if (directory / sw.SWEEP_FILE).exists():
        recorded = sw.read_sweep(directory)
        differ = sw.differences(recorded, plan.record)
        if differ:
            key = differ[0]
            raise UsageError(
                f"{directory}: its {sw.SWEEP_FILE} records {_DIFFERS[key]} "
                f"({_described(key, recorded)}) than this sweep's ({_described(key, plan.record)})"
                f"; go on with it as it was started (dpo sweep --resume {directory}), or give "
                "another --output")
        return {**recorded, **plan.record}
    if directory.exists() and any(directory.iterdir()):
        raise UsageError(f"{directory}: already holds files and no {sw.SWEEP_FILE}, so it is no "
                         "sweep's; give a new or empty --output")
    return {**plan.record, "created": _now()}


def _described(key: str, record: dict[str, Any]) -> str:
    """A part of a sweep's identity (``sweep.IDENTITY``) as a command line gives it."""
    value = record.get(key)
    if key == "grid":
        return " ".join(f"{axis['key']}={','.join(axis['values'])}" for axis in value or [])
    if key == "args":
        return shlex.join(value or []) or "none"
    if key == "config":
        return "none" if not value else f"{value['path']} as it was then"
    return str(value)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_sweep(plan: Plan, directory: Path, flag: str, nproc: int | None, fail_fast: bool
              ) -> None:
    """Train the points that are not finished, one `dpo COMMAND` process each; keep
    sweep.json up to date; then the summary table (and summary.json, summary.csv)."""
    console = log_console()
    record = claim(directory, flag, plan)
    previous = {p["name"]: p for p in record.get("points", [])}
    record["points"] = [{"name": p.name, "directory": p.name, "settings": p.settings,
                         "status": previous.get(p.name, {}).get("status", sw.PENDING)}
                        for p in plan.points]
    directory.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        sw.write_sweep(directory, {**record, "updated": _now()})

    save()
    failed: list[str] = []
    total = len(plan.points)
    for number, (point, entry) in enumerate(zip(plan.points, record["points"]), start=1):
        run_dir = directory / point.name
        state, run_record = sw.point_state(run_dir)
        label = f"point {number}/{total} {point.name}"
        if state == sw.FINISHED:
            entry["status"] = run_record["status"] if run_record else "completed"
            console.print(escape(f"{label}: finished ({entry['status']}); kept"),
                          highlight=False)
            continue
        if state == sw.FOREIGN:
            entry["status"] = "failed: its directory holds files no run wrote"
            console.print(escape(f"{label}: {run_dir} holds files that no run wrote; left "
                                 "alone (move them away and run the sweep again)"),
                          style="red", highlight=False)
            failed.append(point.name)
            save()
            if fail_fast:
                break
            continue
        where = ["--resume", str(run_dir)] if state == sw.INTERRUPTED else ["--output", str(run_dir)]
        args = [*plan.argv[point.name], *where, *(["--nproc", str(nproc)] if nproc else [])]
        how = "resuming" if state == sw.INTERRUPTED else "starting"
        console.print(escape(f"{label}: {how}: dpo {plan.command} {shlex.join(args)}"),
                      highlight=False)
        entry["status"] = "running"
        save()
        code = _run_point(plan.command, args)
        state, run_record = sw.point_state(run_dir)
        if code == 0 and state == sw.FINISHED:
            entry["status"] = run_record["status"] if run_record else "completed"
            entry.pop("error", None)
            save()
            continue
        if code == 130:
            entry["status"] = "interrupted"
            save()
            raise Interrupted(f"interrupted at {point.name}; go on with dpo sweep --resume "
                              f"{directory}")
        entry["status"] = f"failed (exit {code})"
        if run_record and str(run_record.get("status", "")).startswith("failed"):
            entry["error"] = run_record["status"]
        failed.append(point.name)
        console.print(escape(f"{label}: failed (exit {code}); the sweep goes on"
                             if not fail_fast else f"{label}: failed (exit {code})"),
                      style="red", highlight=False)
        save()
        if fail_fast:
            break
    save()
    summary = sw.summarise(directory, record)
    sw.write_summary(directory, summary, [axis["key"] for axis in record["grid"]])
    show(summary, record)
    if failed:
        console.print(escape(f"{len(failed)} of {total} points failed ({', '.join(failed)}); "
                             f"run dpo sweep --resume {directory} to retry them"),
                      style="red", highlight=False)
        raise typer.Exit(1)


def _run_point(command: str, args: list[str]) -> int:
    """`dpo COMMAND ARGS` in a process of its own (fresh memory); its exit status. Ctrl-C
    reaches it too: it records the interruption, and its status is then 130."""
    process = subprocess.Popen([sys.executable, "-m", "dpo", command, *args])
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.wait()
        return 130


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(sw.setting_text(value))


def show(summary: dict[str, Any], record: dict[str, Any]) -> None:
    """The summary as a table on stdout: a row per point (its settings, status without its
    reason (summary.json keeps it), steps, final and best held-out metrics), the best point
    marked."""
    keys = [axis["key"] for axis in record["grid"]]
    metrics = sw.shown_metrics(summary)
    console = log_console(stderr=False)
    direction = "lower" if summary["mode"] == "min" else "higher"
    table = Table(title=f"sweep: {_count(len(summary['points']), 'point')}; best by {summary['metric']} "
                        f"({direction} is better)")
    table.add_column("best")
    for key in keys:
        table.add_column(escape(key))
    table.add_column("status")
    table.add_column("steps", justify="right")
    for when in ("final", "best"):
        for metric in metrics:
            name = sw.SHORT_NAMES.get(metric, metric.removeprefix("eval/"))
            table.add_column(escape(f"{when} {name}"), justify="right")
    table.add_column("best step", justify="right")
    for row in summary["points"]:
        final, best = row["final"] or {}, row["best"] or {}
        table.add_row("*" if row["name"] == summary["best"] else "",
                      *(escape(_shown(row["settings"].get(k))) for k in keys),
                      escape(str(row["status"]).split(":")[0]), _shown(row["steps"]),
                      *(_shown(final.get(m)) for m in metrics),
                      *(_shown(best.get(m)) for m in metrics), _shown(best.get("step")))
    console.print(table)
    if summary["best"] is not None:
        best = next(r["best"] for r in summary["points"] if r["name"] == summary["best"])
        console.print(escape(f"best point: {summary['best']} ({summary['metric']} "
                             f"{_shown(best[summary['metric']])} at step {best['step']})"),
                      highlight=False)
