"""Bad input, many ways: every case must end in exactly one line starting ``error: `` (no
traceback), its exit code, the fragments that say where (file and line) and what to do, and
nothing new or changed on disk.

One row a case. In a row, ``{d}`` is the case's directory, which holds ``FILES`` and ``DIRS``;
the command runs with ``{d}/cwd`` as its working directory, ``{d}/home`` as the home directory
and ``{d}/cache`` as dpo's cache, so whatever it would write stays in the snapshot. Cases run
in-process (Typer's CliRunner) and fail before any training step; most before a model loads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import dpo
from dpo.cli import make_app
from dpo.core.interfaces.plugins import get_plugin_manager, register_plugin
from dpo.testing import plugin_of

RUN = "run --model tiny --backend cpu --no-progress --max-steps 1 --output {d}/out "
EVAL = "eval --model tiny --ref tiny --backend cpu "
PRE = "precompute-ref --model tiny --backend cpu --no-progress "


def line(prompt: object = "Say 1. ", chosen: object = "1", rejected: object = "2") -> str:
    record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return json.dumps(record, ensure_ascii=False) + "\n"


PAIRS = "".join(line(f"Say {i}. ", str(i), str(i + 1)) for i in range(200))
GZ = gzip.compress(PAIRS.encode(), mtime=0)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def run_dir(config: object = None, **files: str) -> dict[str, str]:
    """The files of a run directory: ``run.json`` (with ``config``) and ``files``."""
    record = {"status": "running", "config": config if config is not None else
              {"model": "tiny", "data": "../good.jsonl", "backend": "cpu", "progress": False}}
    return {"run.json": json.dumps(record), **files}


# Every case's directory holds these (name -> bytes or text; a dict is a folder of files).
FILES: dict[str, object] = {
    "good.jsonl": PAIRS,
    "good.jsonl.gz": GZ,
    "flipped.jsonl.gz": flip(GZ, len(GZ) // 2),
    "header.jsonl.gz": flip(GZ, 12),
    "truncated.jsonl.gz": GZ[: len(GZ) // 2],
    "badcrc.jsonl.gz": GZ[:-8] + bytes(8),
    "plain.jsonl.gz": PAIRS,
    "latin1.jsonl.gz": gzip.compress(line("caf\xe9").encode("latin-1"), mtime=0),
    "zero.jsonl.gz": b"",
    "empty-gzip.jsonl.gz": gzip.compress(b"", mtime=0),
    "empty.jsonl": "",
    "blank.jsonl": "\n  \n\n",
    "bad-json.jsonl": line() + '{"prompt": "a", "chosen": \n',
    "unterminated.jsonl": line() + line() + '{"prompt": "a"',
    "two-objects.jsonl": line().strip() + ' {"x": 1}\n',
    "array.jsonl": "[1, 2]\n",
    "string.jsonl": '"Say 1."\n',
    "number.jsonl": line() + "3\n",
    "null.jsonl": "null\n",
    "latin1.jsonl": (line() + line() + line("caf\xe9")).encode("latin-1"),
    "utf16.jsonl": line().encode("utf-16"),
    "unknown-keys.jsonl": '{"question": "a", "answer": "b"}\n',
    "missing-rejected.jsonl": line() + '{"prompt": "a", "chosen": "b"}\n',
    "number-chosen.jsonl": line() + line(chosen=5),
    "all-empty.jsonl": line(chosen="") * 3,
    "one-empty.jsonl": line() + line() + line(chosen=""),
    "same.jsonl": line() + line(chosen="2", rejected="2"),
    "same-start.jsonl": line("Say it. ", "one two three four", "one two three five") * 2,
    "text-key.jsonl": '{"text": "key"}\n',  # the records of the Strict format below
    "text-bug.jsonl": '{"text": "bug"}\n',
    "detect-bug.jsonl": '{"crash": 1}\n',
    "text-bad.jsonl": '{"text": "hi"}\n',
    "text-unusable.jsonl": '{"text": "unusable"}\n' * 2,
    "hh.jsonl": json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: a",
                            "rejected": "\n\nHuman: hi\n\nAssistant: b"}) + "\n",
    "cfg": {
        "latin1.toml": b'model = "caf\xe9"\n',
        "bom-utf16.toml": "max_steps = 1\n".encode("utf-16"),
        "syntax.toml": "max_steps = 1\nlr = [\n",
        "syntax-line.toml": "seed = 1\nlr = \nmax_steps = 1\n",
        "unknown.toml": "max_steps = 1\nmax-stepz = 3\n",
        "options5.toml": "max_steps = 1\noptions = 5\n",
        "options-list.toml": 'options = ["beta"]\n',
        "lr-x.toml": 'lr = "x"\n',
        "batch0.toml": "seed = 1\nbatch-size = 0\n",
        "stop-str.toml": 'stop = "nan-guard"\n',
        "scheduler.toml": 'scheduler = "sometimes"\n',
        "dtype5.toml": "dtype = 5\n",
        "steps-str.toml": 'max_steps = "many"\n',
        "lengths.toml": "max_length = 10\nmax_prompt_length = 20\n",
        "both-eval.toml": 'eval_data = "../good.jsonl"\neval_fraction = 0.1\n',
        "bad-option.toml": "[options]\nbta = 0.1\n",
        "unused-plugin.toml": "[options.ipo]\nbeta = 0.1\n",
        "bad-data.toml": 'model = "tiny"\ndata = "../flipped.jsonl.gz"\n',
    },
    "cwd": {"notes.txt": "the user's own file\n"},
    "home": {"notes.txt": "the user's own file\n"},
    "userdir": {"notes.txt": "the user's own file\n"},
    "runs": {
        "broken-json": {"run.json": '{"status": "runn'},
        "no-config": {"run.json": '{"status": "running"}'},
        "config-list": run_dir(config=[1, 2]),
        "empty-checkpoint": {**run_dir(), "checkpoint-2": {}},
        "truncated-state": {**run_dir(), "checkpoint-2": {"trainer_state.json": '{"train": {"st'}},
        "eval-broken": {"run.json": "{", "final": {}},
    },
}
DIRS = ("dir.jsonl", "cfg/dir.toml", "cache")


def write(root: Path, files: dict[str, object]) -> None:
    for name, content in files.items():
        path = root / name
        if isinstance(content, dict):
            path.mkdir(parents=True, exist_ok=True)
            write(path, content)
        else:
            path.write_bytes(content if isinstance(content, bytes) else str(content).encode())


def snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root``: a folder, or a file's size, mtime and digest."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else
            (p.stat().st_size, p.stat().st_mtime_ns, hashlib.blake2b(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


# -- plugins the plugin cases register -------------------------------------------------------

class Refuser:
    """A plugin command that refuses its input with each kind of dpo error."""

    @dpo.hookimpl
    def dpo_register_commands(self, app):
        @app.command("refuse")
        def refuse(kind: str = "usage", data: str = "x.csv") -> None:
            if kind == "usage":
                raise dpo.UsageError(f"--data {data}: install 'my-plugin[csv]' to read it")
            if kind == "data":
                raise dpo.DataError("no header row; add one naming the columns", data, 3)
            if kind == "param":
                raise typer.BadParameter("must be a .tsv file", param_hint="'--data'")
            raise dpo.DpoError("the remote store is unreachable; try again later")


class Strict(dpo.DataFormat):
    """A data format that finds something wrong with every record."""

    name = "strict-format"

    @classmethod
    def detect(cls, record):
        if "crash" in record:
            raise IndexError("list index out of range")  # a bug: detect must not raise
        return "text" in record

    def parse(self, record):
        if record["text"] == "key":
            return dpo.PreferencePair(record["prompt"], "a", "b")  # KeyError: no prompt
        if record["text"] == "bug":
            return record.missing_method()  # AttributeError: a bug in the plugin
        if record["text"] == "unusable":
            raise dpo.UnusableRecord("no_answer", "the record has no answer")
        raise ValueError(f"text {record['text']!r} is not a question; reword it as one")


class NoReference(dpo.Loss):
    name = "no-ref"
    requires_reference = False

    class Options(dpo.PluginOptions):
        scale: float = 1.0

    def __call__(self, logps):  # never reached: the cases fail before training
        raise AssertionError


class WatchesEval(dpo.StoppingPolicy):
    name = "watch-eval"

    def watches(self):
        return ["eval/loss"]

    def on_step(self, step, metrics):
        return dpo.CONTINUE

    def on_eval(self, step, metrics):
        return dpo.CONTINUE


class BrokenWatch(dpo.StoppingPolicy):
    """A stopping policy with a bug in ``watches``."""

    name = "broken-watch"

    def watches(self):
        raise RuntimeError("metric list not built")


class BrokenInit(dpo.Loss):
    """A loss whose constructor has a bug."""

    name = "broken-init"

    def __init__(self, options):
        raise KeyError("beta")

    def __call__(self, logps):
        raise AssertionError


PLUGINS = (Refuser(), plugin_of(Strict, NoReference, BrokenInit, WatchesEval, BrokenWatch))
LONG = "a" * 300  # a file name longer than any file system allows

ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")


def case(args: str, code: int, *fragments: str, marks: object = ()) -> object:
    name = args.replace(RUN, "run ").replace(EVAL, "eval ").replace(PRE, "precompute-ref ")
    name = name.replace("{d}/", "").replace(LONG, "a" * 8 + "...")
    return pytest.param(args, code, fragments, marks=marks, id=name)


CASES = [
    # -- data files, in `dpo run` -------------------------------------------------------------
    case(RUN + "--data {d}/nope.jsonl", 2, "{d}/nope.jsonl: no such file", "check the path"),
    case(RUN + "--data {d}/nope.jsonl.gz", 2, "{d}/nope.jsonl.gz: no such file"),
    case(RUN + "--data {d}/set[1]/pairs[gguf].jsonl", 2, "{d}/set[1]/pairs[gguf].jsonl: no such"),
    case(RUN + f"--data {{d}}/{LONG}.jsonl", 1, f"{{d}}/{LONG}.jsonl: File name too long"),
    case(EVAL + f"--data {{d}}/{LONG}.jsonl.gz", 1, f"{{d}}/{LONG}.jsonl.gz: File name too long"),
    case(RUN + f"--data {{d}}/good.jsonl --model {{d}}/{LONG}", 1, "File name too long"),
    case(f"run --config {{d}}/{LONG}.toml", 2, f"{{d}}/{LONG}.toml: cannot read the config file "
         "(File name too long)"),
    case(RUN + "--data {d}/dir.jsonl", 2, "{d}/dir.jsonl: not a file", ".jsonl or .jsonl.gz file"),
    case(RUN + "--data {d}/empty.jsonl", 2, "{d}/empty.jsonl: no records", "empty"),
    case(RUN + "--data {d}/blank.jsonl", 2, "{d}/blank.jsonl: no records", "blank lines"),
    case(RUN + "--data {d}/bad-json.jsonl", 2, "{d}/bad-json.jsonl:2: invalid JSON",
         "each line must hold exactly one JSON object"),
    case(RUN + "--data {d}/unterminated.jsonl", 2, "{d}/unterminated.jsonl:3: invalid JSON"),
    case(RUN + "--data {d}/two-objects.jsonl", 2, "{d}/two-objects.jsonl:1: invalid JSON (Extra"),
    case(RUN + "--data {d}/array.jsonl", 2, "{d}/array.jsonl:1: expected a JSON object, got list",
         "each line must hold one object"),
    case(RUN + "--data {d}/string.jsonl", 2, "{d}/string.jsonl:1: expected a JSON object, got str"),
    case(RUN + "--data {d}/number.jsonl", 2, "{d}/number.jsonl:2: expected a JSON object, got int"),
    case(RUN + "--data {d}/null.jsonl", 2, "{d}/null.jsonl:1: expected a JSON object"),
    case(RUN + "--data {d}/latin1.jsonl", 2, "{d}/latin1.jsonl:3: not UTF-8", "save the file as UTF-8"),
    case(RUN + "--data {d}/utf16.jsonl", 2, "{d}/utf16.jsonl:1: not UTF-8", "save the file as UTF-8"),
    case(RUN + "--data {d}/unknown-keys.jsonl", 2, "{d}/unknown-keys.jsonl:1: no installed data "
         "format recognises this record (keys: answer, question)", "pick one with --format"),
    case(RUN + "--data {d}/missing-rejected.jsonl", 2, "{d}/missing-rejected.jsonl:2: ", "rejected"),
    case(RUN + "--data {d}/number-chosen.jsonl", 2, "{d}/number-chosen.jsonl:2: ", "chosen"),
    case(RUN + "--data {d}/all-empty.jsonl", 2, "{d}/all-empty.jsonl: no usable pairs",
         "--strict"),
    case(RUN + "--data {d}/same-start.jsonl --max-length 4 --max-prompt-length 2", 2,
         "{d}/same-start.jsonl: no usable pairs", "--strict"),
    case(EVAL + "--data {d}/all-empty.jsonl", 2, "{d}/all-empty.jsonl: no usable pairs",
         "--strict"),
    case(RUN + "--data {d}/one-empty.jsonl --strict", 2, "{d}/one-empty.jsonl:3: ", "--strict"),
    case(RUN + "--data {d}/same.jsonl --strict", 2, "{d}/same.jsonl:2: ", "--strict"),
    case(RUN + "--data {d}/hh.jsonl --format preference", 2, "{d}/hh.jsonl:1: preference format",
         "prompt"),
    case(RUN + "--data {d}/flipped.jsonl.gz", 2, "{d}/flipped.jsonl.gz: damaged gzip data",
         "copy or compress it again"),
    case(RUN + "--data {d}/header.jsonl.gz", 2, "{d}/header.jsonl.gz: damaged gzip data (Error -3"),
    case(RUN + "--data {d}/truncated.jsonl.gz", 2, "{d}/truncated.jsonl.gz: damaged gzip data after "
         "line", "truncated or corrupt"),
    case(RUN + "--data {d}/badcrc.jsonl.gz", 2, "{d}/badcrc.jsonl.gz: damaged gzip data after line "
         "200 (CRC check failed"),
    case(RUN + "--data {d}/plain.jsonl.gz", 2, "{d}/plain.jsonl.gz: not gzip data",
         "compress it with gzip, or drop the .gz"),
    case(RUN + "--data {d}/latin1.jsonl.gz", 2, "{d}/latin1.jsonl.gz:1: not UTF-8"),
    case(RUN + "--data {d}/zero.jsonl.gz", 2, "{d}/zero.jsonl.gz: no records"),
    case(RUN + "--data {d}/empty-gzip.jsonl.gz", 2, "{d}/empty-gzip.jsonl.gz: no records"),
    case(RUN + "--data {d}/good.jsonl --eval-data {d}/nope.jsonl", 2, "{d}/nope.jsonl: no such file"),
    case(RUN + "--data {d}/good.jsonl --eval-data {d}/truncated.jsonl.gz", 2,
         "{d}/truncated.jsonl.gz: damaged gzip data"),
    case(RUN + "--data {d}/good.jsonl --eval-data {d}/bad-json.jsonl", 2, "{d}/bad-json.jsonl:2: "),
    # -- flags --------------------------------------------------------------------------------
    case(RUN + "--data {d}/good.jsonl --lr -1", 2, "--lr=-1.0: Input should be greater than 0"),
    case(RUN + "--data {d}/good.jsonl --lr 0", 2, "--lr=0.0: "),
    case(RUN + "--data {d}/good.jsonl --lr 1e39", 2, "--lr=1e+39: must be at most 3.403e+38"),
    case(RUN + "--data {d}/good.jsonl --lr nan", 2, "--lr=nan: "),
    case(RUN + "--data {d}/good.jsonl --lr abc", 2, "'--lr'", "see 'dpo run --help'"),
    case(RUN + "--data {d}/good.jsonl --batch-size 0", 2, "--batch-size=0: "),
    case(RUN + "--data {d}/good.jsonl --grad-accum 0", 2, "--grad-accum=0: "),
    case(RUN + "--data {d}/good.jsonl --epochs 0", 2, "--epochs=0.0: "),
    case(RUN + "--data {d}/good.jsonl --max-steps -1", 2, "--max-steps=-1: "),
    case(RUN + "--data {d}/good.jsonl --max-steps 1.5", 2, "'--max-steps'", "dpo run --help"),
    case(RUN + "--data {d}/good.jsonl --eval-fraction 1", 2, "--eval-fraction=1.0: "),
    case(RUN + "--data {d}/good.jsonl --eval-fraction -0.1", 2, "--eval-fraction=-0.1: "),
    case(RUN + "--data {d}/good.jsonl --warmup-ratio 2", 2, "--warmup-ratio=2.0: "),
    case(RUN + "--data {d}/good.jsonl --warmup-steps -3", 2, "--warmup-steps=-3: "),
    case(RUN + "--data {d}/good.jsonl --max-length 1", 2, "--max-length=1: "),
    case(RUN + "--data {d}/good.jsonl --max-prompt-length 0", 2, "--max-prompt-length=0: "),
    case(RUN + "--data {d}/good.jsonl --max-length 10 --max-prompt-length 20", 2,
         "max_prompt_length (20) must be below max_length (10)"),
    case(RUN + "--data {d}/good.jsonl --save-total-limit 0", 2, "--save-total-limit=0: "),
    case(RUN + "--data {d}/good.jsonl --save-steps -1", 2, "--save-steps=-1: "),
    case(RUN + "--data {d}/good.jsonl --eval-steps -1", 2, "--eval-steps=-1: "),
    case(RUN + "--data {d}/good.jsonl --weight-decay -1", 2, "--weight-decay=-1.0: "),
    case(RUN + "--data {d}/good.jsonl --max-grad-norm -1", 2, "--max-grad-norm=-1.0: "),
    case(RUN + "--data {d}/good.jsonl --dtype float8", 2, "--dtype=float8: ", "float32"),
    case(RUN + "--data {d}/good.jsonl --scheduler sometimes", 2, "--scheduler=sometimes: ", "cosine"),
    case(RUN + "--data {d}/good.jsonl --strategy zero3", 2, "--strategy=zero3: ", "fsdp"),
    case(RUN + "--data {d}/good.jsonl --backend tpu9", 2, "unknown backend 'tpu9'", "installed: "),
    case(RUN + "--data {d}/good.jsonl --loss nope", 2, "unknown loss 'nope'", "installed: "),
    case(RUN + "--data {d}/good.jsonl --stop never", 2, "unknown stopping policy 'never'"),
    case(RUN + "--data {d}/good.jsonl --format csv", 2, "unknown data format 'csv'", "installed: "),
    case(RUN + "--data {d}/good.jsonl -o bta=0.1", 2, "loss 'dpo': unknown option 'bta' (valid: beta)"),
    case(RUN + "--data {d}/good.jsonl -o beta", 2, "option 'beta' is not key=value"),
    case(RUN + "--data {d}/good.jsonl -o beta=abc", 2, "loss 'dpo': option beta=abc"),
    case(RUN + "--data {d}/good.jsonl -o ipo.beta=0.1", 2, "options given for 'ipo', which this run "
         "does not use"),
    case(RUN + "--data {d}/good.jsonl -o nan-guard.check_grad_norm=maybe", 2,
         "stopping policy 'nan-guard': option check_grad_norm=maybe"),
    case(RUN + "--data {d}/good.jsonl --eval-data {d}/good.jsonl --eval-fraction 0.1", 2,
         "give either eval_data or eval_fraction, not both"),
    case(RUN + "--data {d}/good.jsonl --seed -1", 2, "--seed=-1: Input should be greater than"),
    case(RUN + f"--data {{d}}/good.jsonl --seed {2**70}", 2, f"--seed={2**70}: "),
    case(PRE + f"--data {{d}}/good.jsonl --seed {2**64}", 2, f"--seed={2**64}: "),
    case(RUN + "--data {d}/good.jsonl --lrr 1", 2, "No such option: --lrr", "dpo run --help"),
    case(RUN + "--data {d}/good.jsonl --nproc 0", 2, "--nproc 0: give at least 1"),
    case(RUN + "--data {d}/good.jsonl --model {d}/nope-model", 2, "--model {d}/nope-model: no such "
         "directory"),
    case(RUN + "--data {d}/good.jsonl --model {d}/nope.gguf", 2, "--model {d}/nope.gguf: no such"),
    case(RUN + "--data {d}/good.jsonl --ref-model {d}/nope-model", 2, "{d}/nope-model: no such"),
    case("run --resume {d}/nothing", 2, "{d}/nothing: no run.json", "dpo run directory"),
    case("run --resume {d}/userdir", 2, "{d}/userdir: no run.json"),
    case("nope", 2, "No such command 'nope'", "dpo --help"),
    case("eval", 2, "Missing option '--model'", "dpo eval --help"),
    # -- config files -------------------------------------------------------------------------
    case("run --config {d}/cfg/dir.toml", 2, "{d}/cfg/dir.toml: is a directory", "TOML file"),
    case("run --config ''", 2, ": is a directory; --config takes a TOML file"),
    case("run --config {d}/cfg/nope.toml", 2, "{d}/cfg/nope.toml: config file not found",
         "check the path"),
    case("run --config {d}/cfg/latin1.toml", 2, "{d}/cfg/latin1.toml: not UTF-8", "save it as UTF-8"),
    case("run --config {d}/cfg/bom-utf16.toml", 2, "{d}/cfg/bom-utf16.toml: not UTF-8"),
    case("run --config {d}/cfg/syntax.toml", 2, "{d}/cfg/syntax.toml: not valid TOML",
         "fix the syntax"),
    case("run --config {d}/cfg/syntax-line.toml", 2, "{d}/cfg/syntax-line.toml:2: not valid TOML"),
    case("run --config {d}/cfg/unknown.toml", 2, "{d}/cfg/unknown.toml:2: unknown key 'max_stepz'",
         "valid keys: "),
    case("run --config {d}/cfg/options5.toml", 2, "{d}/cfg/options5.toml:2: options must be a table"),
    case("run --config {d}/cfg/options-list.toml", 2, "{d}/cfg/options-list.toml:1: options must be"),
    case("run --config {d}/cfg/lr-x.toml", 2, '{d}/cfg/lr-x.toml:1: lr = "x": Input should be a '
         "valid number", "fix it in the config file"),
    case("run --config {d}/cfg/batch0.toml", 2, "{d}/cfg/batch0.toml:2: batch-size = 0: "),
    case("run --config {d}/cfg/stop-str.toml", 2, "{d}/cfg/stop-str.toml:1: stop = ",
         "valid list"),
    case("run --config {d}/cfg/scheduler.toml", 2, "{d}/cfg/scheduler.toml:1: scheduler = "),
    case("run --config {d}/cfg/dtype5.toml", 2, "{d}/cfg/dtype5.toml:1: dtype = 5: "),
    case("run --config {d}/cfg/steps-str.toml", 2, "{d}/cfg/steps-str.toml:1: max-steps = "),
    case("run --config {d}/cfg/lengths.toml", 2, "max_prompt_length (20) must be below"),
    case("run --config {d}/cfg/both-eval.toml", 2, "give either eval_data or eval_fraction"),
    case(RUN + "--data {d}/good.jsonl --config {d}/cfg/bad-option.toml", 2,
         "loss 'dpo': unknown option 'bta'"),
    case(RUN + "--data {d}/good.jsonl --config {d}/cfg/unused-plugin.toml", 2,
         "options given for 'ipo'"),
    case(RUN + "--config {d}/cfg/bad-data.toml", 2, "../flipped.jsonl.gz: damaged gzip data"),
    case(PRE + "--config {d}/cfg/dir.toml", 2, "{d}/cfg/dir.toml: is a directory"),
    case(PRE + "--config {d}/cfg/latin1.toml", 2, "{d}/cfg/latin1.toml: not UTF-8"),
    case(PRE + "--config {d}/cfg/options5.toml", 2, "{d}/cfg/options5.toml:2: options must be"),
    case(PRE + "--config {d}/cfg/lr-x.toml", 2, "{d}/cfg/lr-x.toml:1: lr = "),
    # -- `dpo eval` ---------------------------------------------------------------------------
    case(EVAL + "--data {d}/nope.jsonl", 2, "{d}/nope.jsonl: no such file"),
    case(EVAL + "--data {d}/bad-json.jsonl", 2, "{d}/bad-json.jsonl:2: invalid JSON"),
    case(EVAL + "--data {d}/flipped.jsonl.gz", 2, "{d}/flipped.jsonl.gz: damaged gzip data",
         "copy or compress it again"),
    case(EVAL + "--data {d}/truncated.jsonl.gz", 2, "{d}/truncated.jsonl.gz: damaged gzip data"),
    case(EVAL + "--data {d}/plain.jsonl.gz", 2, "{d}/plain.jsonl.gz: not gzip data"),
    case(EVAL + "--data {d}/latin1.jsonl.gz", 2, "{d}/latin1.jsonl.gz:1: not UTF-8"),
    case(EVAL + "--data {d}/good.jsonl --dtype float8", 2, "--dtype float8: ", "choose one of auto"),
    case(EVAL + "--data {d}/good.jsonl --backend tpu9", 2, "unknown backend 'tpu9'"),
    case(EVAL + "--data {d}/good.jsonl --loss nope", 2, "unknown loss 'nope'"),
    case(EVAL + "--data {d}/good.jsonl -o bta=1", 2, "unknown option 'bta'"),
    case(EVAL + "--data {d}/good.jsonl --format csv", 2, "unknown data format 'csv'"),
    case(EVAL + "--data {d}/good.jsonl --batch-size 0", 2, "'--batch-size'", "dpo eval --help"),
    case("eval --model tiny --data {d}/good.jsonl", 2, "give --ref"),
    # -- `dpo precompute-ref` -----------------------------------------------------------------
    case(PRE + "--data {d}/nope.jsonl", 2, "{d}/nope.jsonl: no such file"),
    case(PRE + "--data {d}/flipped.jsonl.gz", 2, "{d}/flipped.jsonl.gz: damaged gzip data",
         "copy or compress it again"),
    case(PRE + "--data {d}/header.jsonl.gz", 2, "{d}/header.jsonl.gz: damaged gzip data"),
    case(PRE + "--data {d}/truncated.jsonl.gz", 2, "{d}/truncated.jsonl.gz: damaged gzip data"),
    case(PRE + "--data {d}/plain.jsonl.gz", 2, "{d}/plain.jsonl.gz: not gzip data"),
    case(PRE + "--data {d}/latin1.jsonl.gz", 2, "{d}/latin1.jsonl.gz:1: not UTF-8"),
    case(PRE + "--data {d}/good.jsonl --eval-data {d}/badcrc.jsonl.gz", 2,
         "{d}/badcrc.jsonl.gz: damaged gzip data"),
    case(PRE + "--data {d}/good.jsonl --batch-size 0", 2, "--batch-size=0: "),
    case(PRE + "--data {d}/good.jsonl --dtype float8", 2, "--dtype=float8: "),
    case(PRE + "--data {d}/good.jsonl --backend tpu9", 2, "unknown backend 'tpu9'"),
    case(PRE + "--data {d}/good.jsonl --format csv", 2, "unknown data format 'csv'"),
    case(PRE + "--data {d}/good.jsonl --eval-fraction 1.5", 2, "--eval-fraction=1.5: "),
    # -- plugins ------------------------------------------------------------------------------
    case("refuse", 2, "--data x.csv: install 'my-plugin[csv]' to read it"),
    case("refuse --kind data --data {d}/t.csv", 2, "{d}/t.csv:3: no header row; add one"),
    case("refuse --kind param", 2, "Invalid value for '--data': must be a .tsv file",
         "dpo refuse --help"),
    case("refuse --kind other", 1, "the remote store is unreachable; try again later"),
    case(RUN + "--data {d}/text-bad.jsonl", 2, "{d}/text-bad.jsonl:1: strict-format format: text "
         "'hi' is not a question; reword it as one"),
    case(RUN + "--data {d}/text-bug.jsonl", 2, "{d}/text-bug.jsonl:1: strict-format format raised "
         "AttributeError", "fix the format plugin"),
    case(RUN + "--data {d}/detect-bug.jsonl", 2, "{d}/detect-bug.jsonl:1: strict-format format's "
         "detect raised IndexError (list index out of range)", "fix or uninstall that plugin"),
    case(RUN + "--data {d}/text-key.jsonl", 2, "{d}/text-key.jsonl:1: strict-format format: "
         "missing field 'prompt'"),
    case(RUN + "--data {d}/text-unusable.jsonl", 2, "{d}/text-unusable.jsonl: no usable records: all "
         "2 were dropped (no_answer 2)", "--strict"),
    case(RUN + "--data {d}/text-unusable.jsonl --strict", 2, "{d}/text-unusable.jsonl:1: "
         "strict-format format: the record has no answer"),
    case(RUN + "--data {d}/good.jsonl --loss no-ref -o scale=big", 2, "loss 'no-ref': option "
         "scale=big"),
    case(RUN + "--data {d}/good.jsonl --loss no-ref --ref-model tiny", 2, "--ref-model given, but "
         "loss 'no-ref' uses no reference model"),
    case(RUN + "--data {d}/good.jsonl --stop broken-watch", 1, "stopping policy 'broken-watch' "
         "raised RuntimeError in watches(): metric list not built", "fix the plugin"),
    case(RUN + "--data {d}/good.jsonl --loss broken-init", 1, "loss 'broken-init' raised "
         "KeyError in __init__: 'beta'", "fix the plugin"),
    case(RUN + "--data {d}/good.jsonl --stop watch-eval", 2, "stopping on eval/loss needs held-out "
         "pairs", "--eval-data"),
    # -- output paths (refused before any work; nothing of the user's touched) ----------------
    case(RUN + "--data {d}/good.jsonl --output {d}/userdir", 2, "{d}/userdir: already holds "
         "files", "--resume", "--overwrite"),
    case(RUN + "--data {d}/good.jsonl --output . --overwrite", 2, "--output"),
    case(RUN + "--data {d}/good.jsonl --output '' --overwrite", 2, "--output"),
    case(RUN + "--data {d}/good.jsonl --output {d}/home --overwrite", 2, "{d}/home"),
    case(RUN + "--data {d}/good.jsonl --output {d}/userdir --overwrite", 2, "{d}/userdir",
         "run.json"),
    case(RUN + "--data {d}/good.jsonl --output {d}/good.jsonl", 2, "{d}/good.jsonl"),
    case(RUN + "--data {d}/good.jsonl --output {d}/good.jsonl/run", 2, "{d}/good.jsonl"),
    case(RUN + "--data {d}/good.jsonl --output {d}/readonly/run", 2, "{d}/readonly",
         marks=ROOT),
    case(RUN + "--data {d}/good.jsonl --ref-logps {d}/userdir", 2, "--ref-logps {d}/userdir"),
    case(RUN + "--data {d}/good.jsonl --ref-logps {d}/good.jsonl/ref.safetensors", 2,
         "--ref-logps {d}/good.jsonl"),
    case(PRE + "--data {d}/good.jsonl --ref-logps {d}/userdir", 2, "--ref-logps {d}/userdir"),
    case(RUN + "--data {d}/good.jsonl --ref-logps {d}/cwd/notes.txt", 2, "{d}/cwd/notes.txt",
         "not a reference log-prob file"),
    # -- run directories ----------------------------------------------------------------------
    case("run --resume {d}/runs/broken-json", 2, "{d}/runs/broken-json/run.json"),
    case("run --resume {d}/runs/no-config", 2, "{d}/runs/no-config/run.json"),
    case("run --resume {d}/runs/config-list", 2, "{d}/runs/config-list/run.json"),
    case("run --resume {d}/runs/empty-checkpoint", 2, "{d}/runs/empty-checkpoint", "checkpoint"),
    case("run --resume {d}/runs/truncated-state", 2, "{d}/runs/truncated-state", "checkpoint"),
    case("eval --ref tiny --backend cpu --data {d}/good.jsonl --model {d}/runs/eval-broken", 2,
         "{d}/runs/eval-broken/run.json"),
]


@pytest.fixture
def app():
    pm = get_plugin_manager(load_entrypoints=False)
    for plugin in PLUGINS:
        register_plugin(pm, plugin, type(plugin).__name__)
    return make_app(pm)


def test_the_corpus_is_large():
    assert len(CASES) >= 100


@pytest.mark.parametrize("args, code, fragments", CASES)
def test_bad_input(app, tmp_path, monkeypatch, args, code, fragments):
    write(tmp_path, FILES)
    for name in DIRS:
        (tmp_path / name).mkdir()
    (tmp_path / "readonly").mkdir(mode=0o555)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, shlex.split(args.format(d=tmp_path)))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    lines = [text for text in result.output.splitlines() if text.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment.format(d=tmp_path) in lines[0], lines[0]
    assert result.exit_code == code, result.output
    assert snapshot(tmp_path) == before
