"""`dpo sft` on the command line: its options (every `dpo run` option but the preference-only
ones, from the same table), its defaults, the errors that keep the two objectives apart, and
the configuration it hands to the run. Nothing here trains: the run is replaced by a recorder."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import dpo.cli.run as cli_run
from dpo.cli import make_app
from dpo.cli.training_options import TRAINING_OPTIONS, options_of, shown_value
from dpo.core.interfaces.plugins import get_plugin_manager
from dpo.core.training.config import RunConfig, resolve_config, with_preset
from test_cli import assert_one_line_error

PREFERENCE_ONLY = {"ref_model", "precompute_ref", "ref_logps", "loss", "share_prompt",
                   "ref_update_steps", "ref_update_alpha"}
SFT_OPTIONS = [
    "model", "trust_remote_code", "data", "format", "eval_data", "eval_fraction", "max_length",
    "max_prompt_length", "strict", "backend", "nproc", "strategy", "dtype", "option", "stop",
    "lora", "merge", "max_steps", "epochs", "batch_size", "grad_accum", "lr", "weight_decay",
    "warmup_steps", "warmup_ratio", "scheduler", "max_grad_norm", "seed", "shuffle",
    "group_by_length",
    "gradient_checkpointing", "compile", "output", "eval_steps", "eval_at_start", "save_steps",
    "save_total_limit", "keep_checkpoints", "progress", "log_to",
    "sample_prompts", "sample_max_new_tokens", "sample_temperature",
    "eval_tasks", "eval_tasks_steps", "eval_tasks_limit",
    "config", "resume", "overwrite",
]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    return make_app(get_plugin_manager(load_entrypoints=False))


@pytest.fixture
def runs(monkeypatch) -> list[dict[str, Any]]:
    """The calls of the training run, in place of training: each call's configuration and
    keywords; the run reports its weights saved."""
    calls: list[dict[str, Any]] = []

    def record(config, catalog, **kwargs):
        calls.append({"config": config, **kwargs})
        return SimpleNamespace(saved=True)

    monkeypatch.setattr(cli_run, "run", record)
    return calls


def invoke(app: typer.Typer, *args: str) -> Any:
    # Wide enough that rich's help puts each option's text on one line.
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "300"})


def click_command(app: typer.Typer, name: str) -> Any:
    return typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]


def option_names(app: typer.Typer, name: str) -> list[str]:
    return [p.name for p in click_command(app, name).params if p.param_type_name == "option"]


def pairs(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Say {i}. ", "chosen": str(i),
                                        "rejected": str(i + 1)}) + "\n" for i in range(4)))
    return path


def run_directory(path: Path, config: dict[str, Any]) -> Path:
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"status": "running", "config": config}))
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


# --- the options ----------------------------------------------------------------------------

def test_sft_takes_every_run_option_but_the_preference_only_ones(app):
    assert option_names(app, "sft") == SFT_OPTIONS
    run = option_names(app, "run")
    assert set(run) - set(option_names(app, "sft")) == PREFERENCE_ONLY
    assert [name for name in run if name not in PREFERENCE_ONLY] == SFT_OPTIONS


def test_the_table_declares_each_option_once_for_both_commands(app):
    names = [option.name for option in TRAINING_OPTIONS]
    assert len(names) == len(set(names))
    run, sft = options_of("run"), options_of("sft")
    shared = [option for option in run if option.name in {o.name for o in sft}]
    assert shared == sft and all(a is b for a, b in zip(shared, sft))
    for command, rows in (("run", run), ("sft", sft)):
        assert option_names(app, command) == [o.name for o in rows]


def test_sft_help_shows_its_own_defaults_and_texts(app):
    sft = invoke(app, "sft", "--help")
    assert sft.exit_code == 0, sft.output
    text = " ".join(sft.output.split())
    assert text.startswith("Usage: dpo sft [OPTIONS]")
    assert "Supervised fine-tuning: train on the completions (prompts masked)" in text
    assert "Peak learning rate (AdamW). [default: 2e-05; 5e-05 with --data demo]" in text
    assert "Run directory. [default: out-sft]" in text
    assert "Examples per micro-batch. [default: 4; 8 with --data demo]" in text
    for flag in ("--ref-model", "--precompute-ref", "--ref-logps", "--loss", "--share-prompt"):
        assert flag not in text
    run = " ".join(invoke(app, "run", "--help").output.split())
    assert "Pairs per micro-batch." in run and "Examples per micro-batch" not in run
    assert "[default: 1e-06; 5e-05 with --data demo]" in run and "[default: out]" in run


def test_sft_help_defaults_are_what_an_sft_run_takes(app):
    """Every default `dpo sft --help` shows for a RunConfig field is the value of a resolved
    SFT configuration: on a data file, and (after "; ") on the demo where that differs."""
    on_file = resolve_config(*with_preset([{"data": "pairs.jsonl"}], "sft"))
    on_demo = resolve_config(*with_preset([{}], "sft"))
    assert (on_file.objective, on_file.lr, on_file.output) == ("sft", 2e-5, "out-sft")
    checked = 0
    for param in click_command(app, "sft").params:
        help_text = getattr(param, "help", None) or ""
        if param.name not in RunConfig.model_fields or "[default: " not in help_text:
            continue
        shown = help_text.rsplit("[default: ", 1)[1].removesuffix("]")
        plain, _, demo = shown.partition("; ")
        value, demo_value = getattr(on_file, param.name), getattr(on_demo, param.name)
        if param.name == "data":  # the data decides the preset: the default is the demo
            value = demo_value
        if value is not None:
            assert plain == shown_value(value), (param.name, plain, value)
        if demo_value != value:
            assert demo == f"{shown_value(demo_value)} with --data demo", (param.name, demo)
        else:
            assert demo == "", (param.name, demo)
        checked += 1
    assert checked >= 30


@pytest.mark.parametrize("args", [
    ["--ref-model", "tiny"], ["--precompute-ref"], ["--no-precompute-ref"],
    ["--ref-logps", "ref.pt"], ["--loss", "ipo"], ["--share-prompt"], ["--no-share-prompt"],
])
def test_preference_only_flags_are_unknown_to_sft(app, tmp_path, runs, args):
    out = tmp_path / "out"
    result = invoke(app, "sft", "--output", str(out), *args)
    assert_one_line_error(result, 2, f"No such option: {args[0]}", "see 'dpo sft --help'")
    assert not out.exists() and runs == []


# --- the configuration it hands to the run ---------------------------------------------------

def test_sft_resolves_an_sft_configuration(app, tmp_path, monkeypatch, runs):
    monkeypatch.chdir(tmp_path)
    data = pairs(tmp_path / "pairs.jsonl")
    result = invoke(app, "sft", "--data", str(data), "-o", "nan-guard.check_grad_norm=false")
    assert result.exit_code == 0, result.output
    [call] = runs
    config = call["config"]
    assert (config.objective, config.lr, config.output) == ("sft", 2e-5, "out-sft")
    assert (config.max_steps, config.batch_size) == (0, 4)  # RunConfig's: no demo preset
    assert config.options == {"nan-guard": {"check_grad_norm": "false"}}
    assert (call["resume"], call["overwrite"]) == (False, False)
    assert not (tmp_path / "out-sft").exists()


def test_sft_on_the_demo_takes_the_sft_preset_under_the_config_file_and_flags(app, tmp_path,
                                                                              monkeypatch, runs):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "sft.toml"
    config.write_text("max_steps = 12\nbatch_size = 2\n"
                      "[options.nan-guard]\ncheck_grad_norm = false\n")
    result = invoke(app, "sft", "--config", str(config), "--batch-size", "3", "--overwrite")
    assert result.exit_code == 0, result.output
    [call] = runs
    resolved = call["config"]
    assert (resolved.objective, resolved.data, resolved.lr) == ("sft", "demo", 5e-5)
    assert (resolved.max_steps, resolved.batch_size, resolved.eval_steps) == (12, 3, 10)
    assert resolved.options == {"nan-guard": {"check_grad_norm": False}}
    assert call["overwrite"] is True


def test_run_still_resolves_a_dpo_configuration(app, tmp_path, monkeypatch, runs):
    monkeypatch.chdir(tmp_path)
    data = pairs(tmp_path / "pairs.jsonl")
    assert invoke(app, "run", "--data", str(data), "-o", "beta=0.2").exit_code == 0
    config = runs[0]["config"]
    assert (config.objective, config.lr, config.output) == ("dpo", 1e-6, "out")
    assert config.options == {"dpo": {"beta": "0.2"}}


def test_sft_resumes_an_sft_run_from_its_record(app, tmp_path, runs):
    recorded = {"model": "tiny", "data": "pairs.jsonl", "objective": "sft", "lr": 3e-5,
                "max_steps": 5}
    out = run_directory(tmp_path / "out", recorded)
    result = invoke(app, "sft", "--resume", str(out), "--max-steps", "8")
    assert result.exit_code == 0, result.output
    [call] = runs
    assert call["resume"] is True
    assert (call["config"].objective, call["config"].lr, call["config"].max_steps) == (
        "sft", 3e-5, 8)
    assert call["config"].output == str(out)


# --- errors that keep the objectives apart -----------------------------------------------------

@pytest.mark.parametrize("line", [
    'loss = "ipo"', 'ref_model = "tiny"', 'ref-logps = "ref.pt"', "precompute_ref = false",
    "share-prompt = true", 'objective = "dpo"',
])
def test_sft_refuses_a_config_file_with_a_preference_key(app, tmp_path, runs, line):
    config = tmp_path / "sft.toml"
    config.write_text(f'model = "tiny"\n{line}\nmax_steps = 2\n')
    out = tmp_path / "out"
    key = line.split(" =")[0].replace("-", "_")
    hint = ["use `dpo run --config"] if key == "objective" else []
    assert_one_line_error(invoke(app, "sft", "--config", str(config), "--output", str(out)), 2,
                          f"{config}:2: ", key, "`dpo sft` does not take it", *hint)
    assert not out.exists() and runs == []


def test_sft_refuses_plain_option_keys_from_the_flags_or_the_file(app, tmp_path, runs):
    out = tmp_path / "out"
    assert_one_line_error(invoke(app, "sft", "--output", str(out), "-o", "beta=0.1"), 2,
                          "-o beta=0.1", "`dpo sft` has no loss", "plugin.key=value")
    config = tmp_path / "sft.toml"
    config.write_text('model = "tiny"\n\n[options]\nbeta = 0.1\n')
    assert_one_line_error(invoke(app, "sft", "--config", str(config), "--output", str(out)), 2,
                          f"{config}:3: [options] beta", "`dpo sft` has no loss",
                          "plugin.key = value")
    assert not out.exists() and runs == []


def test_run_refuses_a_config_file_of_objective_sft(app, tmp_path, runs):
    config = tmp_path / "run.toml"
    config.write_text('objective = "sft"\n')
    out = tmp_path / "out"
    assert_one_line_error(invoke(app, "run", "--config", str(config), "--output", str(out)), 2,
                          f"{config}:1: ", "`dpo run` does not take it",
                          f"use `dpo sft --config {config}`")
    assert not out.exists() and runs == []


@pytest.mark.parametrize("command, recorded, fragment", [
    ("run", {"objective": "sft"}, "is an SFT run; resume it with `dpo sft --resume {out}`"),
    ("sft", {"objective": "dpo"}, "is a DPO run; resume it with `dpo run --resume {out}`"),
    ("sft", {}, "is a DPO run; resume it with `dpo run --resume {out}`"),  # from before SFT
])
def test_resume_refuses_a_run_of_the_other_objective(app, tmp_path, runs, command, recorded,
                                                     fragment):
    out = run_directory(tmp_path / "out", {"model": "tiny", "data": "pairs.jsonl", **recorded})
    before = snapshot(out)
    assert_one_line_error(invoke(app, command, "--resume", str(out)), 2,
                          f"{out} " + fragment.format(out=out))
    assert snapshot(out) == before and runs == []


# --- --nproc -------------------------------------------------------------------------------------

def test_torchrun_command_runs_the_given_command_in_each_worker():
    assert cli_run.torchrun_command("sft", 2, ["--lr", "0.001"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "dpo", "sft", "--lr", "0.001"]


def test_nproc_relaunches_sft_with_exactly_the_options_given(app, tmp_path, monkeypatch, runs):
    commands: list[list[str]] = []

    class Workers:  # in place of torchrun: keeps its command line; the workers succeed
        def __init__(self, command: list[str], **kwargs: Any):
            commands.append(command)
            self.stderr = io.StringIO()

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(cli_run.subprocess, "Popen", Workers)
    data = pairs(tmp_path / "pairs.jsonl")
    args = ["--data", str(data), "--nproc", "2", "--backend", "cpu", "--lr", "0.001",
            "--no-shuffle", "--stop", "nan-guard", "--stop", "early-stopping",
            "-o", "nan-guard.check_grad_norm=false", "--output", str(tmp_path / "out")]
    result = invoke(app, "sft", *args)
    assert result.exit_code == 0, result.output
    [command] = commands
    assert command[:9] == cli_run.torchrun_command("sft", 2, [])
    assert command[9:] == [
        "--data", str(data), "--backend", "cpu", "--option", "nan-guard.check_grad_norm=false",
        "--stop", "nan-guard", "--stop", "early-stopping", "--lr", "0.001", "--no-shuffle",
        "--output", str(tmp_path / "out")]
    assert runs == [] and not (tmp_path / "out").exists()
