"""``dpo run`` (DPO on preference pairs) and ``dpo sft`` (supervised fine-tuning): the training
commands, both built from one table of options (``dpo.cli.training_options``) and both handing
their resolved configuration to ``dpo.core.training.run.run``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import typer

from dpo.cli.common import one_line_errors
from dpo.cli.training_options import (COMMAND_OF, OBJECTIVE_OF, RUN, SFT, callback_for,
                                      fields_not_taken_by, options_of)
from dpo.core.training import strategy as strat
from dpo.core.interfaces.errors import DpoError, Interrupted, UsageError
from dpo.core.training.config import ConfigFile, read_config_file, resolve_config, with_preset
from dpo.core.interfaces.options import parse_assignments
from dpo.core.interfaces.plugins import Catalog
from dpo.core.training.rundir import check_output, nothing_to_resume, read_record, reopen_hint
from dpo.core.training.run import recorded_config, run

# Set by the --nproc launcher for its workers: each writes its exit code to DIR/rank-N.
EXIT_DIR_ENV = "DPO_EXIT_DIR"
# torchrun's traceback once a worker has failed (its frames name these files).
_TORCHRUN_TAIL = re.compile(r"torch/distributed/(elastic|run\.py)")
# One of torchrun's log lines ("W1206 23:31:32.781000 27152 torch/distributed/elastic/...").
_TORCHRUN_LOG = re.compile(r"^[IWEF]\d{4} [\d:.]+ \d+ \S*torch/distributed/")

_LAYERS = """Options come from defaults, then --config, then flags. The run directory gets
run.json, metrics.jsonl, checkpoint-N/ and final/ (a Hugging Face model directory)."""

# Each training command's help: its first paragraph (one line: the summary in `dpo --help`),
# then what both share.
HELP: dict[str, str] = {
    RUN: f"Train a policy on preference pairs with DPO or a relative.\n\n{_LAYERS}",
    SFT: "Supervised fine-tuning: train on the completions (prompts masked) of "
         "prompt/completion records, chat `messages`, or preference pairs (their chosen "
         f"side).\n\n{_LAYERS}",
}
# What an objective's runs are called, and what they do, in messages.
_RUN_KIND = {"dpo": "a DPO run", "sft": "an SFT run"}
_TRAINS = {"dpo": "preference training", "sft": "supervised fine-tuning"}


def register(app: typer.Typer, catalog: Catalog) -> None:
    """``dpo run`` and ``dpo sft``: the same body, for each command's options."""
    for command in (RUN, SFT):
        def body(ctx: typer.Context, values: dict[str, Any], command: str = command) -> None:
            train(command, catalog, ctx, values)

        callback = one_line_errors(callback_for(command, body, HELP[command]))
        app.command(command)(callback)


def train(command: str, catalog: Catalog, ctx: typer.Context, values: dict[str, Any]) -> None:
    """The body of ``dpo run`` and ``dpo sft``: ``values`` are the command's options (the
    names of ``options_of(command)``). Resolves the configuration (a resumed run's record, or
    else RunConfig's defaults, the objective's and the demo preset; then --config, then flags)
    and runs it here or, with --nproc, in torchrun's workers."""
    objective = OBJECTIVE_OF[command]
    flags = flags_of(command, values)
    resume, config = values["resume"], values["config"]
    layers = []
    if resume is not None:
        # A resumed run starts from its recorded configuration; flags given now still win.
        check_output(resume, "--resume")
        recorded = recorded_config(resume)
        check_resumed_objective(command, resume, recorded)
        layers.append(recorded)
        flags["output"] = str(resume)
    if config is not None:
        layers.append(check_config_file(command, read_config_file(config)))
    layers = layers if resume is not None else with_preset([*layers, flags], objective)[:-1]
    resolved = resolve_config(*layers, flags)
    if resume is not None and _already_complete(resume, resolved):
        return
    if values["nproc"] is not None and resolved.eval_tasks:
        raise UsageError("--eval-tasks: benchmarks are scored in one process; drop --nproc, or "
                         "score the run's models afterwards with `dpo eval --tasks`")
    if values["nproc"] is not None:
        raise typer.Exit(launch(values["nproc"], resolved, catalog, ctx, command))
    with _exit_code_recorded():
        outcome = run(resolved, catalog, resume=resume is not None,
                      overwrite=values["overwrite"])
        if not outcome.saved:
            # Stopped by a policy that distrusts the weights (e.g. nan-guard): a failed run.
            raise typer.Exit(1)


def flags_of(command: str, values: dict[str, Any]) -> dict[str, Any]:
    """The RunConfig layer that ``command``'s flags (``values``) make: the fields they set, and
    their plugin options (``-o``) by key."""
    # A repeatable option given no value is unset: Typer says None, click (a sweep's parse) ().
    flags: dict[str, Any] = {option.name: None if values[option.name] == () else values[option.name]
                             for option in options_of(command) if option.is_field}
    flags["options"] = parse_assignments(values["option"] or [])
    if OBJECTIVE_OF[command] == "sft" and (plain := _loss_keys(flags["options"])):
        raise UsageError(f"-o {plain[0]}={flags['options'][plain[0]]}: `dpo sft` has no loss to "
                         "take a plain key; plugin options are qualified: -o plugin.key=value "
                         "(e.g. -o nan-guard.check_grad_norm=false)")
    return flags


def new_run_config(command: str, values: dict[str, Any]) -> Any:
    """The RunConfig that ``command`` with ``values`` (its options; no --resume) starts a run
    with: the objective's defaults and the demo preset, then --config, then flags."""
    flags = flags_of(command, values)
    layers = []
    if values["config"] is not None:
        layers.append(check_config_file(command, read_config_file(values["config"])))
    return resolve_config(*with_preset([*layers, flags], OBJECTIVE_OF[command])[:-1], flags)


def check_resumed_objective(command: str, output: Path, recorded: Any) -> None:
    """``--resume`` of a run that trained another objective than ``command`` does: say which
    command resumes it (a record without one is a DPO run, from before SFT)."""
    objective = recorded.get("objective", "dpo") if isinstance(recorded, dict) else "dpo"
    if _another_objective(command, objective):
        raise UsageError(f"{output} is {_RUN_KIND[objective]}; resume it with "
                         f"`dpo {COMMAND_OF[objective]} --resume {output}`")


def check_config_file(command: str, table: ConfigFile) -> ConfigFile:
    """``table`` (a --config file) if ``command`` takes all it sets, else a one-line error at
    the key's line: another objective, preference-only options for ``dpo sft``, or plain
    [options] keys (a loss's) for ``dpo sft``."""
    given = table.get("objective")
    if _another_objective(command, given):
        raise UsageError(f"{table.where('objective')}: objective = {json.dumps(given)}: "
                         f"`dpo {command}` does not take it ({given} is {_TRAINS[given]}); use "
                         f"`dpo {COMMAND_OF[given]} --config {table.path}`, or remove the key")
    for key in fields_not_taken_by(command):
        if key in table:
            raise UsageError(f"{table.where(key)}: {key}: `dpo {command}` does not take it (an "
                             "option of preference training, `dpo run`); remove it from the file")
    if OBJECTIVE_OF[command] == "sft" and (plain := _loss_keys(table.get("options", {}))):
        raise UsageError(f"{table.where('options')}: [options] {plain[0]}: `dpo sft` has no "
                         "loss to take a plain key; qualify plugin options ([options.<plugin>] "
                         "tables, or plugin.key = value)")
    return table


def _loss_keys(options: dict[str, Any]) -> list[str]:
    """The plain keys of plugin options (``beta``, not ``nan-guard.x`` nor a plugin's table):
    those that ``split_options`` gives to the loss."""
    return [key for key, value in options.items() if "." not in key and not isinstance(value, dict)]


def _another_objective(command: str, objective: Any) -> bool:
    """Whether ``objective`` (as a record or a file gives it) is one that another command than
    ``command`` trains; a value that is no objective is left to RunConfig's validation."""
    return (isinstance(objective, str) and objective in COMMAND_OF
            and objective != OBJECTIVE_OF[command])


def _already_complete(output: Path, config: Any) -> bool:
    """``--resume`` of a run that has ended, asking for no more steps: say so, and leave its
    record as it is."""
    try:
        record = read_record(output)
    except UsageError:
        return False
    if not nothing_to_resume(record, output, config.model_dump()):
        return False
    print(f"{output}: the run is already complete ({record['status']}, {record.get('steps')} "
          f"steps); its model is in {output / 'final'}{reopen_hint(record)}", file=sys.stderr)
    return True


class _exit_code_recorded:
    """Under the --nproc launcher, leave this worker's exit code where the launcher reads it;
    ranks other than 0 stay silent on input errors, which every rank finds alike."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        rank = int(os.environ.get("RANK", 0))
        code = 0
        if isinstance(exc, DpoError):
            code = exc.exit_code
        elif isinstance(exc, typer.Exit):
            code = exc.exit_code
        elif exc is not None:
            code = 1
        directory = os.environ.get(EXIT_DIR_ENV)
        if directory and strat.launched_by_torchrun():
            Path(directory, f"rank-{rank}").write_text(f"{code}\n")
        if isinstance(exc, (UsageError, Interrupted)) and rank != 0:  # rank 0 says it
            raise typer.Exit(code) from None
        return False


def launch(nproc: int, config: Any, catalog: Catalog, ctx: typer.Context,
           command: str = RUN) -> int:
    """``dpo COMMAND --nproc N ARGS``: ``torchrun --nproc-per-node N -m dpo COMMAND ARGS``; the
    exit code is the failing worker's (rank 0's first), else torchrun's."""
    from dpo.core.training.run import resolve_backend

    if strat.launched_by_torchrun():
        raise UsageError("--nproc: this process already runs under torchrun; drop --nproc")
    backend = resolve_backend(config.backend, catalog)
    strat.check_launch(nproc, backend.name, backend.device_count(), backend.name != "cpu")
    workers = torchrun_command(command, nproc, _command_line_args(ctx, skip={"nproc"}))
    with tempfile.TemporaryDirectory(prefix="dpo-exit-") as exits:
        env = dict(os.environ, **{EXIT_DIR_ENV: exits})
        env.setdefault("OMP_NUM_THREADS", "1")
        if sys.stderr.isatty():  # the workers' output is piped through here: keep it rich
            env.setdefault("TTY_COMPATIBLE", "1")
            env.setdefault("TTY_INTERACTIVE", "1")
        status, codes = supervise(workers, env, Path(exits), nproc)
    failed = [codes[r] for r in sorted(codes) if codes[r]]
    if failed:
        return failed[0]
    return status


# How long torchrun may go on once every worker has recorded its exit code (normally well
# under a second: the workers end, then torchrun).
LINGER_SECONDS = 60.0


def supervise(command: list[str], env: dict[str, str], exits: Path, nproc: int,
              linger: float | None = None) -> tuple[int, dict[int, int]]:
    """Run torchrun's ``command``, relaying its output until torchrun reports a failed worker
    (the worker has said what went wrong); (torchrun's status, each rank's recorded exit code).
    Once all ``nproc`` workers have recorded theirs, torchrun has ``linger`` seconds to end; a
    process still hanging then (a worker that never exits) is stopped with a warning, and the
    run's status is the workers' codes. A first Ctrl-C waits for the workers' checkpoint."""
    linger = LINGER_SECONDS if linger is None else linger
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    failed_worker = threading.Event()
    relay = threading.Thread(target=_relay, args=(process.stderr, failed_worker), daemon=True)
    relay.start()
    done_at: float | None = None
    interrupted = False
    while True:
        try:
            status = process.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        except KeyboardInterrupt:
            # Ctrl-C reached the workers too: each finishes its step and rank 0 checkpoints and
            # says so; wait for that (relaying it). A second Ctrl-C stops them, and this, at once.
            if interrupted:
                raise
            interrupted = True
            continue
        if done_at is None and len(_recorded(exits)) >= nproc:
            done_at = time.monotonic()
        if done_at is not None and time.monotonic() - done_at > linger:
            print(f"warning: every worker recorded its exit code, but torchrun was still "
                  f"running {linger:.0f} s later; stopped it", file=sys.stderr)
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            status = 0
            break
    relay.join(timeout=5)  # the rest of the output; a lingering child may hold the pipe
    codes = _recorded(exits)
    if status and failed_worker.is_set() and not any(codes.values()):
        print(f"error: torchrun failed (exit {status})", file=sys.stderr)
    return status, codes


def _relay(stream: Any, failed_worker: threading.Event) -> None:
    """Copy the workers' output to ours, without torchrun's log lines, up to torchrun's
    traceback once a worker has failed (the worker has said what went wrong); closes
    ``stream`` at its end. After a Ctrl-C, torchrun logs first, then the workers say where
    they stopped: that is relayed."""
    logged = False
    with stream:
        for line in stream:
            if _TORCHRUN_LOG.match(line):
                logged = True
                continue
            if (logged and line.startswith("Traceback")) or _TORCHRUN_TAIL.search(line):
                failed_worker.set()
            if not failed_worker.is_set():
                sys.stderr.write(line)
                sys.stderr.flush()


def _recorded(exits: Path) -> dict[int, int]:
    """The exit codes the workers have recorded so far, by rank."""
    codes = {}
    for path in exits.glob("rank-*"):
        try:
            text = path.read_text()
        except OSError:
            continue
        codes[int(path.name.removeprefix("rank-"))] = int(text) if text.strip() else 1
    return codes


def torchrun_command(command: str, nproc: int, args: list[str]) -> list[str]:
    """The command line that runs ``dpo COMMAND ARGS`` in ``nproc`` processes under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(nproc), "-m", "dpo", command, *args]


def _command_line_args(ctx: typer.Context, skip: set[str]) -> list[str]:
    """The options given on the command line, as arguments again (for the workers)."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.param_type_name != "option" or param.name in skip or param.name is None:
            continue
        source = ctx.get_parameter_source(param.name)
        if getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if param.secondary_opts and not value:
                args.append(param.secondary_opts[0])
            elif value:
                args.append(param.opts[0])
            continue
        for item in (value if param.multiple else [value]):
            args += [param.opts[0], str(item)]
    return args
