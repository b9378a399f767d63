"""The command line through Typer's CliRunner: help, listings, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import dpo
from dpo.cli import make_app
from dpo.core.interfaces.plugins import get_plugin_manager, register_plugin


def write_pairs(path: Path) -> Path:
    rows = [{"prompt": f"Say {i}. ", "chosen": f"{i}", "rejected": f"{i + 1}"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def app():
    return make_app(get_plugin_manager(load_entrypoints=False))


def invoke(app, *args):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_the_commands(app):
    result = invoke(app, "--help")
    assert result.exit_code == 0
    for command in ("run", "plugins", "backends"):
        assert command in result.output


@pytest.mark.parametrize("flag, value, kind, installed", [
    ("--backend", "tpu9", "backend", "cpu, cuda, rocm, xla, xpu"),
    ("--loss", "nope", "loss", "cdpo, cpo, dpo, dpop"),
    ("--stop", "never", "stopping policy", "nan-guard"),
    ("--format", "csv", "data format", "preference"),
])
def test_unknown_names_exit_2_listing_what_is_installed(app, tmp_path, flag, value, kind, installed):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    result = invoke(app, "run", "--data", str(data), "--output", str(out), flag, value)
    assert_one_line_error(result, 2, f"unknown {kind} '{value}'", installed)
    assert not out.exists()


@pytest.mark.parametrize("options, fragment", [
    (["-o", "bta=0.1"], "loss 'dpo': unknown option 'bta' (valid: beta)"),
    (["--loss", "cdpo", "-o", "eps=0.7"], "loss 'cdpo': option eps=0.7"),
    (["-o", "beta"], "option 'beta' is not key=value"),
    (["-o", "nan-guard.check_grad_norm=maybe"], "stopping policy 'nan-guard': option check_grad_norm=maybe"),
    (["-o", "ipo.beta=0.1"], "options given for 'ipo', which this run does not use"),
    (["--max-length", "10", "--max-prompt-length", "20"], "max_prompt_length (20) must be below"),
    (["--lr", "-1"], "--lr=-1.0"),
])
def test_bad_options_are_one_line_errors(app, tmp_path, options, fragment):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    result = invoke(app, "run", "--data", str(data), "--output", str(out), *options)
    assert_one_line_error(result, 2, fragment)
    assert not out.exists()


def test_malformed_data_names_file_and_line_and_writes_nothing(app, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    with data.open("a") as fh:
        fh.write('{"prompt": "x", "chosen": \n')
    out = tmp_path / "out"
    result = invoke(app, "run", "--model", "tiny", "--data", str(data), "--output", str(out))
    assert_one_line_error(result, 2, f"{data}:9:")
    assert not out.exists()


def test_unavailable_backend_says_why(app, tmp_path):
    from dpo.backends.cuda import CUDABackend

    if CUDABackend.is_available():
        pytest.skip("a CUDA device is present")
    data = write_pairs(tmp_path / "pairs.jsonl")
    result = invoke(app, "run", "--data", str(data), "--output", str(tmp_path / "o"), "--backend", "cuda")
    assert_one_line_error(result, 2, "backend 'cuda' is not available here: ",
                          CUDABackend.unavailable_reason())


def test_existing_output_needs_resume_or_overwrite(app, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke(app, "run", "--data", str(data), "--output", str(out))
    assert_one_line_error(result, 2, "already holds files", "--resume")
    assert (out / "keep.txt").read_text() == "mine"
    assert_one_line_error(invoke(app, "run", "--resume", str(tmp_path / "nothing")), 2, "no run.json")


def test_config_file_then_flags(app, tmp_path):
    """The file sets max_steps 3, lr 0.01, beta 0.3 and a nan-guard option; the flag
    --max-steps 2 wins over the file; run.json records the merged values."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "tiny"\ndata = "{data}"\nmax-steps = 3\nlr = 0.01\nbackend = "cpu"\n'
        '[options]\nbeta = 0.3\n[options.nan-guard]\ncheck_grad_norm = false\n'
    )
    out = tmp_path / "out"
    result = invoke(app, "run", "--config", str(config), "--max-steps", "2", "--output", str(out),
                    "--no-progress")
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "run.json").read_text())["config"]
    assert recorded["max_steps"] == 2 and recorded["lr"] == 0.01 and recorded["batch_size"] == 4
    assert recorded["options"] == {"dpo": {"beta": 0.3}, "nan-guard": {"check_grad_norm": False}}


def test_config_file_errors(app, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("max_stepz = 3\n")
    assert_one_line_error(invoke(app, "run", "--config", str(bad)), 2, "unknown key 'max_stepz'")
    bad.write_text("max_steps = [\n")
    assert_one_line_error(invoke(app, "run", "--config", str(bad)), 2, "not valid TOML")


def test_config_files_that_are_no_toml_are_one_line_errors(app, tmp_path):
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'model = "caf\xe9"\n')
    assert_one_line_error(invoke(app, "run", "--config", str(latin)), 2, f"{latin}: not UTF-8")
    assert_one_line_error(invoke(app, "run", "--config", str(tmp_path)), 2,
                          f"{tmp_path}: is a directory; --config takes a TOML file")
    five = tmp_path / "five.toml"
    five.write_text("max_steps = 1\noptions = 5\n")
    assert_one_line_error(invoke(app, "precompute-ref", "--config", str(five)), 2,
                          f"{five}:2: options must be a table")


def test_brackets_in_an_error_are_text_not_markup(app, tmp_path):
    """Rich would read ``[gguf]`` in a path as a markup tag and print nothing of it."""
    missing = tmp_path / "runs[gguf]" / "pairs[1].jsonl"
    result = invoke(app, "run", "--model", "tiny", "--data", str(missing),
                    "--output", str(tmp_path / "out"))
    assert_one_line_error(result, 2, f"{missing}: no such file")


def test_reporter_lines_print_brackets_as_given(tmp_path):
    from rich.console import Console

    from dpo.core.training.report import Reporter

    console = Console(record=True, width=200)
    reporter = Reporter(tmp_path, console=console)
    reporter.info("data: /data/set[1]/pairs.jsonl")
    reporter.warn("install it with pip install 'dpo-trainer[gguf]'")
    assert console.export_text() == ("data: /data/set[1]/pairs.jsonl\n"
                                     "warning: install it with pip install 'dpo-trainer[gguf]'\n")


def test_eval_prints_a_model_path_with_brackets_as_given(app, tmp_path, monkeypatch):
    from dpo.core.model.tiny import build_tiny_model, build_tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=42).save_pretrained("m[v2]")
    tokenizer.save_pretrained("m[v2]")
    data = write_pairs(tmp_path / "pairs.jsonl")
    result = invoke(app, "eval", "--model", "m[v2]", "--ref", "tiny", "--data", str(data),
                    "--backend", "cpu")
    assert result.exit_code == 0, result.output
    assert "m[v2] against tiny, 8 pairs" in result.output


def test_plugins_json_shows_provenance_and_registrations(app):
    result = invoke(app, "plugins", "--json")
    assert result.exit_code == 0
    report = json.loads(result.output)
    by_name = {p["name"]: p for p in report["plugins"]}
    entry = by_name["dpo.plugins.losses.dpo"]
    assert entry["distribution"] == "dpo-trainer" and entry["version"] == dpo.__version__
    assert entry["hooks"] == {"dpo_register_losses": ["dpo", "cdpo", "robust"]}
    assert report["failed"] == [] and report["conflicts"] == []
    table = invoke(app, "plugins")
    assert table.exit_code == 0 and "dpo.plugins.stopping.nan_guard" in table.output


def test_backends_lists_every_backend_with_a_reason(app):
    result = invoke(app, "backends", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["cpu"]["available"] and rows["cpu"]["devices"] == 1 and rows["cpu"]["reason"] == ""
    for name in ("xla", "rocm", "xpu"):
        assert rows[name]["available"] or rows[name]["reason"]
    assert "backend" in invoke(app, "backends").output


class CommandPlugin:
    @dpo.hookimpl
    def dpo_register_commands(self, app):
        @app.command("hello", rich_help_panel="Plugins")
        def hello(name: str = "world") -> None:
            """Say hello."""
            typer.echo(f"hello {name}")


class RefusingCommandPlugin:
    @dpo.hookimpl
    def dpo_register_commands(self, app):
        @app.command("refuse")
        def refuse(data: str = "x.jsonl") -> None:
            """Refuse any input, the way a plugin reports bad input."""
            if data.endswith(".csv"):
                raise dpo.DataError("CSV is not read here; convert it to JSONL", data, 3)
            raise dpo.UsageError(f"--data {data}: install 'my-plugin[extra]' to read it")


def test_a_plugin_command_raising_a_dpo_error_prints_one_line():
    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, RefusingCommandPlugin(), "refuser")
    app = make_app(pm)
    assert_one_line_error(invoke(app, "refuse"), 2,
                          "error: --data x.jsonl: install 'my-plugin[extra]' to read it")
    assert_one_line_error(invoke(app, "refuse", "--data", "t.csv"), 2,
                          "error: t.csv:3: CSV is not read here; convert it to JSONL")


class BrokenCommandPlugin:
    @dpo.hookimpl
    def dpo_register_commands(self, app):
        raise RuntimeError("cannot build my command")


def test_plugin_commands_run_and_are_listed_while_a_broken_one_is_reported():
    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, CommandPlugin(), "greeter")
    register_plugin(pm, BrokenCommandPlugin(), "broken")
    app = make_app(pm)
    assert invoke(app, "hello", "--name", "dpo").output == "hello dpo\n"
    assert "Plugins" in invoke(app, "--help").output
    report = json.loads(invoke(app, "plugins", "--json").output)
    assert {p["name"]: p["hooks"] for p in report["plugins"]}["greeter"] == {
        "dpo_register_commands": ["hello"]}
    assert [(f["name"], f["error"]) for f in report["failed"]] == [
        ("broken", "RuntimeError: cannot build my command")]


def test_python_dash_m_dpo_and_console_script():
    result = subprocess.run([sys.executable, "-m", "dpo", "backends", "--json"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cpu" in {r["name"] for r in json.loads(result.stdout)}
    script = Path(sys.executable).with_name("dpo")
    assert script.exists()
    bad = subprocess.run([str(script), "run", "--backend", "nope"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown backend 'nope'")
    assert "Traceback" not in bad.stderr


def test_main_prints_an_error_building_the_app_as_one_line(monkeypatch, capsys):
    """Plugins are collected while the app is built, before any command's own error handling."""
    import dpo.cli

    def refuse(pm):
        raise dpo.UsageError("loss 'x' is registered twice; uninstall one")

    monkeypatch.setattr(dpo.cli, "make_app", refuse)
    with pytest.raises(SystemExit) as info:
        dpo.cli.main(["plugins"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: loss 'x' is registered twice; uninstall one\n"
