"""Loggers (``--log-to``): TensorBoard, W&B (offline) and MLflow (a local file store) get what
metrics.jsonl gets, read back with each one's own reader; a resumed run logs each step once; a
logger that raises is turned off with one warning; missing packages and unknown names are
one-line errors before anything is written."""

from __future__ import annotations

import glob
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

import dpo
from dpo.core.interfaces.logger import RunInfo
from dpo.core.training.config import RunConfig
from dpo.core.training.report import Reporter, read_metrics
from dpo.plugins.loggers.mlflow import metric_name
from dpo.plugins.loggers.tensorboard import markdown_table
from dpo.testing import CrashAt, command_line, plugin_of, write_arithmetic_pairs

BUILT_IN = ("tensorboard", "wandb", "mlflow")


class Recorder(dpo.Logger):
    """Keeps every call, in order, in the class (a run makes its own instance)."""

    name = "recorder"
    calls: list[tuple[str, Any]] = []

    def start(self, run):
        Recorder.calls.append(("start", run))

    def log_metrics(self, step, metrics):
        Recorder.calls.append(("log_metrics", (step, dict(metrics))))

    def log_table(self, name, columns, rows, step):
        Recorder.calls.append(("log_table", (name, list(columns), [list(r) for r in rows], step)))

    def log_text(self, name, text, step):
        Recorder.calls.append(("log_text", (name, text, step)))

    def finish(self, status):
        Recorder.calls.append(("finish", status))


def broken(method: str) -> type[dpo.Logger]:
    """A logger that raises in ``method`` (at its second call of log_metrics)."""
    seen = {"n": 0}

    def fail(self, *args):
        seen["n"] += 1
        if method != "log_metrics" or seen["n"] == 2:
            raise RuntimeError(f"{method} is broken")

    return type(f"Broken_{method}", (dpo.Logger,), {"name": f"broken-{method}", method: fail})


BROKEN = [broken(m) for m in ("start", "log_metrics", "finish")]


def invoke():
    return command_line(plugin_of(CrashAt, Recorder, *BROKEN))


def run_args(tmp: Path, out: Path, *extra: str) -> list[str]:
    data = write_arithmetic_pairs(tmp / "pairs.jsonl")
    return ["run", "--model", "tiny", "--data", str(data), "--eval-fraction", "0.25",
            "--backend", "cpu", "--max-steps", "6", "--lr", "1e-3", "--batch-size", "4",
            "--save-steps", "2", "--eval-steps", "2", "--output", str(out), *extra]


@pytest.fixture(scope="module")
def tracker_env(tmp_path_factory):
    """W&B offline with its files in a temporary directory; no MLflow server configured."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("wandb-dir")))
        mp.setenv("WANDB_SILENT", "true")
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
            mp.delenv(key, raising=False)
        yield mp


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tracker_env):
    """A 6-step run with every built-in logger, and the same run crashed at step 3 (after
    checkpoint-2) and resumed: the straight run's and the resumed run's directories."""
    for name in BUILT_IN:
        pytest.importorskip(name if name != "mlflow" else "mlflow.tracking")
    tmp = tmp_path_factory.mktemp("loggers")
    call = invoke()
    loggers = ["--log-to", "jsonl,tensorboard,wandb,mlflow"]
    straight = call(*run_args(tmp, tmp / "straight", *loggers, "--log-to", "recorder"))
    assert straight.exit_code == 0, straight.output
    recorded = list(Recorder.calls)
    CrashAt.armed_at = 3
    crashed = call(*run_args(tmp, tmp / "resumed", *loggers, "--stop", "nan-guard",
                             "--stop", "crash-at"))
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output, crashed.output
    resumed = call("run", "--resume", str(tmp / "resumed"))
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and "checkpoint-2" in resumed.output
    Recorder.calls.clear()
    return tmp / "straight", tmp / "resumed", recorded


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


KEYS = ("loss", "rewards/accuracies", "lr", "grad_norm", "eval/loss", "eval/rewards/margins")


# -- TensorBoard --------------------------------------------------------------------------------

def tensorboard_series(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def assert_same(got: list[tuple[int, float]], want: list[tuple[int, float]], rel: float = 1e-6):
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=rel, abs=1e-7) or (math.isnan(a) and math.isnan(b))


def test_tensorboard_scalars_are_the_metrics_file(runs):
    straight, _, _ = runs
    records = read_metrics(straight / "metrics.jsonl")
    scalars = tensorboard_series(straight)
    numeric = {k for r in records for k, v in r.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(scalars) == numeric
    for key in KEYS:
        assert_same(scalars[key], series(records, key))  # TensorBoard keeps float32
    assert [s for s, _ in scalars["eval/loss"]] == [0, 2, 4, 6]


def test_tensorboard_resumed_curves_are_the_uninterrupted_ones(runs):
    straight, resumed, _ = runs
    # The crashed attempt logged step 3, the resumed one again: purge_step drops the first.
    assert len(list((resumed / "tensorboard").glob("events.out.tfevents.*"))) == 2
    want, got = tensorboard_series(straight), tensorboard_series(resumed)
    assert set(got) == set(want)
    for key in KEYS:
        assert_same(got[key], want[key])


# -- MLflow -------------------------------------------------------------------------------------

def mlflow_history(out: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    state = json.loads((out / "mlflow-run.json").read_text())
    assert state["tracking_uri"] == (out / "mlruns").resolve().as_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=state["tracking_uri"])
        history = client.get_metric_history(state["run_id"], key)
    return sorted((m.step, m.value) for m in history)


def test_mlflow_history_is_the_metrics_file(runs):
    straight, _, _ = runs
    records = read_metrics(straight / "metrics.jsonl")
    for key in KEYS:
        assert_same(mlflow_history(straight, key), series(records, key), rel=1e-12)


def test_mlflow_resumed_run_continues_the_same_run_logging_each_step_once(runs):
    straight, resumed, _ = runs
    for key in KEYS:
        assert_same(mlflow_history(resumed, key), mlflow_history(straight, key))
    assert len([p for p in (resumed / "mlruns").rglob("meta.yaml") if p.parent.name != "0"
                and (p.parent / "metrics").is_dir()]) == 1  # one MLflow run


def test_mlflow_metric_names_are_sanitised():
    # dpo's own names pass unchanged; others lose what MLflow refuses.
    assert metric_name("eval/rewards/accuracies") == "eval/rewards/accuracies"
    assert metric_name("eval/tasks/arc_easy/acc_norm") == "eval/tasks/arc_easy/acc_norm"
    assert metric_name("eval/tasks/gsm8k/exact_match,strict-match") == \
        "eval/tasks/gsm8k/exact_match_strict-match"
    assert metric_name("/a//../b/") == "a/b"


def test_mlflow_tracking_uri_is_honoured(tmp_path, monkeypatch):
    pytest.importorskip("mlflow.tracking")
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    result = command_line()("run", "--model", "tiny", "--data", str(data), "--backend", "cpu",
                            "--max-steps", "2", "--batch-size", "4", "--output", str(out),
                            "--log-to", "mlflow")
    assert result.exit_code == 0, result.output
    assert not (out / "mlruns").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    run_id = json.loads((out / "mlflow-run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "mine"
    assert run.info.status == "FINISHED" and run.data.params["max_steps"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]


# -- Weights & Biases ---------------------------------------------------------------------------

def wandb_records(path: Path):
    """The records of a ``.wandb`` file, parsed with wandb's own protobuf messages. The file is
    a LevelDB-style log (wandb's transaction log): a 7-byte header (``:W&B``, magic, version),
    then 32 KiB blocks of chunks, each a 7-byte header (CRC32C, length, type: 1 full, 2 first,
    3 middle, 4 last) and its bytes; a block's last < 7 bytes are padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the block's end
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(wandb_dir: Path, run_id: str) -> tuple[dict[str, list[tuple[int, float]]], set]:
    """Every history row logged to W&B run ``run_id`` (every offline attempt), as series by
    key; and the projects its run records name."""
    out: dict[str, list[tuple[int, float]]] = {}
    projects = set()
    files = sorted(glob.glob(str(wandb_dir / "wandb" / f"offline-run-*-{run_id}" / "*.wandb")))
    assert files
    for file in files:
        for record in wandb_records(Path(file)):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                projects.add(record.run.project)
            if kind != "history":
                continue
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_") and isinstance(value, (int, float)):
                    out.setdefault(key, []).append((row["_step"], value))
    return out, projects


def test_wandb_offline_history_is_the_metrics_file(runs, tracker_env):
    import os

    straight, _, _ = runs
    state = json.loads((straight / "wandb-run.json").read_text())
    history, projects = wandb_history(Path(os.environ["WANDB_DIR"]), state["id"])
    assert projects == {"dpo"}
    records = read_metrics(straight / "metrics.jsonl")
    for key in KEYS:
        assert_same(history[key], series(records, key), rel=1e-12)


def test_wandb_resumed_run_continues_the_same_run_logging_each_step_once(runs, tracker_env):
    import os

    straight, resumed, _ = runs
    wandb_dir = Path(os.environ["WANDB_DIR"])
    run_id = json.loads((resumed / "wandb-run.json").read_text())["id"]
    attempts = glob.glob(str(wandb_dir / "wandb" / f"offline-run-*-{run_id}"))
    assert len(attempts) == 2  # the crashed attempt and the resumed one, one W&B run id
    got, _ = wandb_history(wandb_dir, run_id)
    want, _ = wandb_history(wandb_dir, json.loads((straight / "wandb-run.json").read_text())["id"])
    for key in KEYS:
        assert_same(got[key], want[key])


# -- any logger ---------------------------------------------------------------------------------

def test_a_logger_gets_every_record_and_the_run_then_finishes(runs):
    straight, _, recorded = runs
    assert recorded[0][0] == "start" and recorded[-1] == ("finish", "completed")
    run = recorded[0][1]
    assert isinstance(run, RunInfo) and run.output == straight
    assert (run.step, run.resumed, run.logged_through) == (0, False, 0)
    assert run.config["max_steps"] == 6 and run.config["log_to"] == [
        "jsonl", "tensorboard", "wandb", "mlflow", "recorder"]
    logged = [args for what, args in recorded if what == "log_metrics"]
    records = read_metrics(straight / "metrics.jsonl")
    assert [step for step, _ in logged] == [r["step"] for r in records]
    assert [m for _, m in logged] == records


def test_a_raising_logger_is_warned_about_once_and_turned_off(runs):
    straight, _, _ = runs
    record = json.loads((straight / "run.json").read_text())
    assert record["status"] == "completed" and (straight / "final").is_dir()


def test_raising_loggers_each_warn_once_and_the_run_completes(tmp_path):
    result = invoke()(*run_args(tmp_path, tmp_path / "out", "--max-steps", "2", "--log-to",
                                "broken-start,broken-log_metrics,broken-finish,recorder"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "broken" in line]
    assert lines == [
        "warning: logger 'broken-start' raised RuntimeError in start: start is broken; it is "
        "turned off, the run goes on",
        "warning: logger 'broken-log_metrics' raised RuntimeError in log_metrics: log_metrics "
        "is broken; it is turned off, the run goes on",
        "warning: logger 'broken-finish' raised RuntimeError in finish: finish is broken; it is "
        "turned off, the run goes on"], result.output
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "completed"
    assert Recorder.calls[-1] == ("finish", "completed")  # the others went on
    Recorder.calls.clear()


def test_a_crashed_run_tells_its_loggers_it_failed(tmp_path):
    CrashAt.armed_at = 1
    result = invoke()(*run_args(tmp_path, tmp_path / "out", "--stop", "crash-at",
                                "--log-to", "recorder"))
    assert result.exit_code == 1
    assert [c for c in Recorder.calls if c[0] == "finish"] == [("finish", "failed")]
    Recorder.calls.clear()


class CtrlC(dpo.StoppingPolicy):
    """Ctrl-C at step 1, as the terminal would deliver it."""

    name = "ctrl-c"

    def on_step(self, step, metrics):
        raise KeyboardInterrupt


def test_an_interrupted_run_tells_its_loggers(tmp_path):
    call = command_line(plugin_of(CtrlC, Recorder))
    result = call(*run_args(tmp_path, tmp_path / "out", "--stop", "ctrl-c", "--log-to",
                            "recorder"))
    assert result.exit_code == 130, result.output
    assert [c for c in Recorder.calls if c[0] == "finish"] == [("finish", "interrupted")]
    assert [c[1][0] for c in Recorder.calls if c[0] == "log_metrics"] == [0, 1]
    Recorder.calls.clear()


def test_sft_logs_too(tmp_path):
    result = invoke()("sft", "--model", "tiny", "--data",
                      str(write_arithmetic_pairs(tmp_path / "pairs.jsonl")), "--backend", "cpu",
                      "--max-steps", "2", "--batch-size", "4", "--output", str(tmp_path / "out"),
                      "--log-to", "recorder")
    assert result.exit_code == 0, result.output
    logged = [args for what, args in Recorder.calls if what == "log_metrics"]
    assert [m for _, m in logged] == read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [s for s, _ in logged] == [1, 2] and Recorder.calls[-1] == ("finish", "completed")
    Recorder.calls.clear()


def test_tables_and_texts_reach_each_tracker(tmp_path, tracker_env):
    """Each built-in logger takes a table and a text, read back where it keeps them."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow.tracking")
    from dpo.plugins.loggers.mlflow import MlflowLogger
    from dpo.plugins.loggers.tensorboard import TensorBoardLogger
    from dpo.plugins.loggers.wandb import WandbLogger

    reporter = Reporter(tmp_path, progress=False)
    reporter.attach([TensorBoardLogger(), WandbLogger(), MlflowLogger()],
                    RunInfo(output=tmp_path, config={"lr": 0.1}))
    reporter.start(total_steps=1, done=0)
    reporter.table("samples", ["prompt", "completion"], [["1+1?", "2"], ["a|b", tmp_path]], 1)
    reporter.text("notes/first", "hello", 1)
    reporter.close()
    reporter.end("completed")
    assert reporter.loggers.active == []  # none raised, all finished

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["tensors"]) == ["notes/first/text_summary", "samples/text_summary"]

    state = json.loads((tmp_path / "mlflow-run.json").read_text())
    run_dir = next((tmp_path / "mlruns").glob(f"*/{state['run_id']}"))
    table = json.loads((run_dir / "artifacts" / "tables" / "samples" / "step-1.json").read_text())
    assert table == {"columns": ["prompt", "completion"],
                     "data": [["1+1?", "2"], ["a|b", str(tmp_path)]]}
    assert (run_dir / "artifacts" / "text" / "notes" / "first" / "step-1.txt").read_text() == "hello"

    import os

    run_id = json.loads((tmp_path / "wandb-run.json").read_text())["id"]
    files = glob.glob(os.path.join(os.environ["WANDB_DIR"], "wandb", f"offline-run-*-{run_id}",
                                   "files", "media", "table", "samples_*.table.json"))
    assert len(files) == 1
    assert json.loads(Path(files[0]).read_text())["data"] == [["1+1?", "2"], ["a|b", str(tmp_path)]]


def test_the_reporter_forwards_tables_and_texts(tmp_path):
    reporter = Reporter(tmp_path, progress=False)
    info = RunInfo(output=tmp_path, config={}, step=0)
    reporter.attach([Recorder(), BROKEN[0]()], info)
    reporter.start(total_steps=2, done=0)
    reporter.table("samples", ["prompt", "completion"], [["1+1?", "2"]], 1)
    reporter.text("note", "hello", 1)
    reporter.record({"step": 1, "loss": 0.5})
    reporter.close()
    reporter.end("stopped")
    reporter.end("stopped")  # once only
    assert Recorder.calls == [("start", info),
                              ("log_table", ("samples", ["prompt", "completion"],
                                             [["1+1?", "2"]], 1)),
                              ("log_text", ("note", "hello", 1)),
                              ("log_metrics", (1, {"step": 1, "loss": 0.5})),
                              ("finish", "stopped")]
    Recorder.calls.clear()


def test_only_an_enabled_reporter_starts_loggers(tmp_path):
    reporter = Reporter(tmp_path, enabled=False, progress=False)  # a rank other than 0
    reporter.attach([Recorder()], RunInfo(output=tmp_path, config={}))
    reporter.start(total_steps=2, done=0)
    reporter.record({"step": 1, "loss": 0.5})
    reporter.close()
    reporter.end("completed")
    assert Recorder.calls == [] and not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_tables_are_markdown():
    assert markdown_table(["a", "b"], [[1, "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"


# -- choosing loggers ---------------------------------------------------------------------------

def test_log_to_takes_lists_and_comma_separated_names():
    assert RunConfig().log_to == ["jsonl"]
    assert RunConfig(log_to="tensorboard, wandb").log_to == ["tensorboard", "wandb"]
    assert RunConfig(log_to=["jsonl,mlflow", "mlflow"]).log_to == ["jsonl", "mlflow"]


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_an_unknown_logger_is_one_line_listing_the_installed_ones(tmp_path):
    out = tmp_path / "out"
    # Only the unknown name: a built-in whose package is missing would be refused first.
    result = command_line()(*run_args(tmp_path, out, "--log-to", "nope"))
    one_line_error(result, "unknown logger 'nope'; installed: jsonl, mlflow, tensorboard, wandb")
    assert not out.exists()


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_missing_package_names_the_extra_before_anything_is_written(tmp_path, monkeypatch,
                                                                     name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    out = tmp_path / "out"
    result = command_line()(*run_args(tmp_path, out, "--log-to", name))
    one_line_error(result, f"logger '{name}' needs {name}: pip install 'dpo-trainer[{name}]'")
    assert not out.exists()


def test_a_config_file_chooses_loggers_and_their_options(tmp_path):
    pytest.importorskip("tensorboard")
    config = tmp_path / "run.toml"
    config.write_text('log_to = ["tensorboard"]\n[options.tensorboard]\ndirectory = "tb"\n')
    out = tmp_path / "out"
    result = command_line()(*run_args(tmp_path, out, "--max-steps", "1", "--config", str(config)))
    assert result.exit_code == 0, result.output
    assert list((out / "tb").glob("events.out.tfevents.*"))
    bad = command_line()(*run_args(tmp_path, tmp_path / "bad", "-o", "tensorboard.dir=x",
                                   "--log-to", "tensorboard"))
    one_line_error(bad, "logger 'tensorboard': unknown option 'dir' (valid: directory)")


def test_a_new_run_in_the_directory_drops_the_earlier_tensorboard_curves(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    first = command_line()(*run_args(tmp_path, out, "--max-steps", "3", "--log-to", "tensorboard"))
    assert first.exit_code == 0, first.output
    again = command_line()(*run_args(tmp_path, out, "--max-steps", "1", "--lr", "1e-4",
                                     "--log-to", "tensorboard", "--overwrite"))
    assert again.exit_code == 0, again.output
    scalars = tensorboard_series(out)
    assert_same(scalars["loss"], series(read_metrics(out / "metrics.jsonl"), "loss"))
    assert [s for s, _ in scalars["eval/loss"]] == [0, 1]


def test_dpo_plugins_lists_the_loggers():
    result = command_line()("plugins", "--json")
    assert result.exit_code == 0, result.output
    hooks = {p["name"]: p["hooks"] for p in json.loads(result.output)["plugins"]}
    assert hooks["dpo.plugins.loggers.tensorboard"] == {"dpo_register_loggers": ["tensorboard"]}
    assert hooks["dpo.plugins.loggers.wandb"] == {"dpo_register_loggers": ["wandb"]}
    assert hooks["dpo.plugins.loggers.mlflow"] == {"dpo_register_loggers": ["mlflow"]}



def test_unpaired_samples_reach_the_loggers_with_their_label(tmp_path):
    """KTO (``--loss kto`` on pairs: each pair two labelled examples): the samples table has
    the lines' ``label`` column too, and its rows are samples.jsonl's lines of each step."""
    Recorder.calls.clear()
    out = tmp_path / "out"
    result = invoke()(*run_args(tmp_path, out, "--max-steps", "2", "--loss", "kto",
                                "--sample-prompts", "2", "--sample-max-new-tokens", "3",
                                "--log-to", "recorder"))
    assert result.exit_code == 0, result.output
    tables = [args for what, args in Recorder.calls if what == "log_table"]
    lines = read_metrics(out / "samples.jsonl")
    assert [step for *_, step in tables] == [0, 2]
    for name, columns, rows, step in tables:
        assert columns == ["index", "prompt", "chosen", "rejected", "completion", "label"]
        assert rows == [[line[c] for c in columns] for line in lines if line["step"] == step]
        assert all(isinstance(row[-1], bool) for row in rows)
    Recorder.calls.clear()

@pytest.mark.parametrize("command", ["run", "sft"])
def test_help_names_the_extras(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # wide enough that rich cuts no word
    result = command_line()(command, "--help")
    assert result.exit_code == 0, result.output
    text = "".join(result.output.split())  # rich wraps and frames the help
    assert "pipinstall'dpo-trainer[tensorboard]'`(or[wandb],[mlflow])" in text.replace("│", "")


def test_sample_generations_reach_the_loggers_as_a_table_per_evaluation(tmp_path):
    """``--sample-prompts 2`` with evaluations at steps 0, 2 and 4: each evaluation's two
    generations reach a logger as one ``samples`` table whose rows are samples.jsonl's lines
    of that step (index, prompt, chosen, rejected, completion)."""
    Recorder.calls.clear()
    out = tmp_path / "out"
    result = invoke()(*run_args(tmp_path, out, "--max-steps", "4", "--sample-prompts", "2",
                                "--sample-max-new-tokens", "4", "--log-to", "recorder"))
    assert result.exit_code == 0, result.output
    tables = [args for what, args in Recorder.calls if what == "log_table"]
    lines = read_metrics(out / "samples.jsonl")
    assert [step for *_, step in tables] == [0, 2, 4]
    for name, columns, rows, step in tables:
        assert name == "samples" and columns == ["index", "prompt", "chosen", "rejected",
                                                 "completion"]
        assert rows == [[line[c] for c in columns] for line in lines if line["step"] == step]
        assert len(rows) == 2
    Recorder.calls.clear()
