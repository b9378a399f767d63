"""RunConfig layering and the learning-rate schedule."""

from __future__ import annotations

import pytest

from dpo.core.training.config import (OBJECTIVE_DEFAULTS, read_config_file, resolve_config,
                                      split_options, with_preset)
from dpo.core.training.demo import DEMO_PRESET, SFT_DEMO_PRESET
from dpo.core.interfaces.errors import UsageError
from dpo.core.training.schedule import lr_factor


def test_layers_later_wins_and_options_merge_per_plugin():
    defaults_file = {"lr": 0.1, "max_steps": 5, "options": {"beta": 0.2, "nan-guard": {"check_grad_norm": False}}}
    flags = {"lr": 0.5, "max_steps": None, "options": {"beta": "0.3"}}
    config = resolve_config(defaults_file, flags)
    assert config.lr == 0.5 and config.max_steps == 5 and config.batch_size == 4
    assert config.options == {"dpo": {"beta": "0.3"}, "nan-guard": {"check_grad_norm": False}}


def test_unqualified_options_follow_the_selected_loss():
    assert split_options({"beta": 1, "nan-guard.x": 2}, "ipo") == {"ipo": {"beta": 1}, "nan-guard": {"x": 2}}
    assert resolve_config({"loss": "ipo", "options": {"beta": 1}}).options == {"ipo": {"beta": 1}}


def test_invalid_values_are_usage_errors():
    with pytest.raises(UsageError, match="--batch-size=0"):
        resolve_config({"batch_size": 0})
    with pytest.raises(UsageError, match="either eval_data or eval_fraction"):
        resolve_config({"eval_data": "x.jsonl", "eval_fraction": 0.1})


@pytest.mark.parametrize("objective, preset", [("dpo", DEMO_PRESET), ("sft", SFT_DEMO_PRESET)])
def test_with_preset_puts_the_objectives_defaults_then_its_demo_preset_under_the_layers(
        objective, preset):
    layer = {"max_steps": 3}
    assert with_preset([layer], objective) == [OBJECTIVE_DEFAULTS[objective], preset, layer]
    on_file = {"data": "pairs.jsonl"}
    assert with_preset([on_file, layer], objective) == [OBJECTIVE_DEFAULTS[objective], on_file,
                                                        layer]


def test_an_sft_configuration_takes_sfts_defaults_and_the_demo_preset_over_them():
    on_file = resolve_config(*with_preset([{"data": "pairs.jsonl"}], "sft"))
    assert (on_file.objective, on_file.lr, on_file.output) == ("sft", 2e-5, "out-sft")
    on_demo = resolve_config(*with_preset([{"lr": None}], "sft"))
    assert (on_demo.objective, on_demo.lr, on_demo.max_steps) == ("sft", 5e-5, 40)
    flags = resolve_config(*with_preset([{"data": "x.jsonl", "lr": 1e-4, "output": "o"}], "sft"))
    assert (flags.objective, flags.lr, flags.output) == ("sft", 1e-4, "o")
    dpo = resolve_config(*with_preset([{"data": "pairs.jsonl"}]))
    assert (dpo.objective, dpo.lr, dpo.output) == ("dpo", 1e-6, "out")


def test_schedule_by_hand():
    """warmup 2 of 10 steps: factors (s+1)/3 = 1/3, 2/3; then linear from 1 down:
    step 2 -> 1 - 0/8 = 1, step 6 -> 1 - 4/8 = 0.5; cosine at step 6 -> (1 + cos(pi/2))/2 = 0.5,
    at step 4 -> (1 + cos(pi/4))/2 = 0.853553..."""
    assert lr_factor(0, "linear", 2, 10) == pytest.approx(1 / 3)
    assert lr_factor(1, "linear", 2, 10) == pytest.approx(2 / 3)
    assert lr_factor(2, "linear", 2, 10) == 1.0
    assert lr_factor(6, "linear", 2, 10) == 0.5
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5)
    assert lr_factor(4, "cosine", 2, 10) == pytest.approx(0.8535533905932737)
    assert lr_factor(9, "constant", 0, 10) == 1.0


@pytest.mark.parametrize("content, message", [
    (b"max_steps = 3\nlr = [\n", "{path}: not valid TOML (Invalid value at the end of the "
     "file); fix the syntax, see https://toml.io"),
    (b"max_steps = 3\nlr = \n", "{path}:2: not valid TOML (Invalid value, column 6); fix the "
     "syntax, see https://toml.io"),
    (b'model = "caf\xe9"\n', "{path}: not UTF-8 text, so not a TOML file; save it as UTF-8"),
    (b"max_steps = 3\n\nmax-stepz = 3\n", "{path}:3: unknown key 'max_stepz'; valid keys: "),
    (b"max_steps = 3\noptions = 5\n", "{path}:2: options must be a table: an [options] section "
     "of key = value lines, or [options.<plugin>] sections"),
    (b"options = [1]\n", "{path}:1: options must be a table"),
])
def test_config_file_errors_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "run.toml"
    path.write_bytes(content)
    with pytest.raises(UsageError) as info:
        resolve_config(read_config_file(path))
    assert str(info.value).startswith(message.format(path=path)), str(info.value)


def test_a_config_file_that_is_a_directory_or_missing(tmp_path):
    with pytest.raises(UsageError, match="is a directory; --config takes a TOML file"):
        read_config_file(tmp_path)
    with pytest.raises(UsageError, match="config file not found; check the path given to --config"):
        read_config_file(tmp_path / "nope.toml")


@pytest.mark.parametrize("content, message", [
    ('lr = "x"\n', '{path}:1: lr = "x": Input should be a valid number, unable to parse string '
     "as a number; fix it in the config file"),
    ("seed = 1\n\nbatch-size = 0\n", "{path}:3: batch-size = 0: Input should be greater than 0; "
     "fix it in the config file"),
    ('stop = "nan-guard"\n', '{path}:1: stop = "nan-guard": Input should be a valid list; '
     "fix it in the config file"),
    ('scheduler = "cosine"\n[options]\nbeta = 0.1\n', None),
])
def test_bad_values_in_a_config_file_name_the_file_and_line_flags_the_flag(tmp_path, content,
                                                                          message):
    """The key's line is where it is assigned; a flag's value is named as the flag, and a
    flag that overrides a bad file value wins."""
    path = tmp_path / "run.toml"
    path.write_text(content)
    table = read_config_file(path)
    if message is None:
        assert resolve_config(table).scheduler == "cosine"
        return
    with pytest.raises(UsageError) as info:
        resolve_config(table)
    assert str(info.value) == message.format(path=path)
    key = next(iter(table)) if "seed" not in table else "batch_size"
    flag_value = {"lr": 0.5, "batch_size": 2, "stop": ["nan-guard"]}[key]
    assert getattr(resolve_config(table, {key: flag_value}), key) == flag_value
    with pytest.raises(UsageError, match=f"^--{key.replace('_', '-')}=-1: "):
        resolve_config(table, {key: -1})


def test_a_utf8_config_file_may_start_with_a_byte_order_mark(tmp_path):
    """Windows editors save UTF-8 with a BOM; TOML parsers refuse it at line 1, column 1."""
    path = tmp_path / "run.toml"
    path.write_bytes("max_steps = 7\n".encode("utf-8-sig"))
    assert resolve_config(read_config_file(path)).max_steps == 7
