"""Tests of the example plugin, written the way a third-party plugin author would."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import dpo
from dpo.cli import make_app
from dpo.core.data.reading import load_pairs
from dpo.core.data.stats import DataStats
from dpo.core.interfaces.plugins import collect
from dpo_example_plugin import HingeLoss, TSVFormat


def test_installed_plugin_is_discovered_through_the_entry_point(dpo_plugin_manager):
    catalog = collect(dpo_plugin_manager)
    assert catalog.losses.providers["example-hinge"] == "example"
    source = dpo_plugin_manager.sources["example"]
    assert (source.distribution, source.builtin) == ("dpo-example-plugin", False)


def test_hinge_golden_values():
    """beta = 0.5. Pair 1: r_w = -1 - (-2) = 1, r_l = -3 - (-1) = -2, h = 3, beta*h = 1.5 >= 1
    -> loss max(0, 1 - 1.5) = 0. Pair 2: r_w = 0, r_l = 1, h = -1 -> loss 1 - (-0.5) = 1.5.
    Rewards: beta*r_w = 0.5 and 0; beta*r_l = -1 and 0.5."""
    loss = HingeLoss(beta=0.5)
    out = loss(dpo.PairLogps(
        policy_chosen=torch.tensor([-1.0, -4.0]), policy_rejected=torch.tensor([-3.0, -1.0]),
        ref_chosen=torch.tensor([-2.0, -4.0]), ref_rejected=torch.tensor([-1.0, -2.0]),
        chosen_tokens=torch.tensor([3, 3]), rejected_tokens=torch.tensor([3, 3]),
    ))
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-1.0, 0.5]))


def test_bad_option_is_one_line_error():
    with pytest.raises(dpo.UsageError, match="example-hinge.*beta"):
        HingeLoss.parse_options({"beta": "-1"})


def test_dpo_plugins_lists_it_and_its_command(dpo_plugin_manager):
    result = CliRunner().invoke(make_app(dpo_plugin_manager), ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    report = {p["name"]: p for p in json.loads(result.output)["plugins"]}
    assert report["example"]["hooks"] == {
        "dpo_register_losses": ["example-hinge"],
        "dpo_register_data_formats": ["example-tsv"],
        "dpo_register_loggers": ["example-print"],
        "dpo_register_commands": ["hinge-table"],
    }


def test_plugin_command_runs(dpo_plugin_manager):
    result = CliRunner().invoke(make_app(dpo_plugin_manager), ["hinge-table", "--beta", "0.1"])
    assert result.exit_code == 0, result.output
    assert "h=20 loss=0" in result.output and "h=0 loss=1" in result.output


def test_a_run_trains_with_the_plugin_loss(dpo_plugin_manager, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 = ", "chosen": f"{i + 1}",
                                        "rejected": f"{i + 2}"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(dpo_plugin_manager), [
        "run", "--no-progress", "--model", "tiny", "--data", str(data), "--backend", "cpu",
        "--loss", "example-hinge", "-o", "beta=0.5", "--max-steps", "3", "--batch-size", "4",
        "--output", str(out), "--log-to", "example-print"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Step 1: policy == reference, so h = 0 and the hinge loss is max(0, 1 - 0) = 1.
    assert steps[0]["loss"] == pytest.approx(1.0, abs=1e-6)
    # The plugin's logger printed every step's loss, as metrics.jsonl has it.
    printed = [line for line in result.output.splitlines() if line.startswith("step ")]
    assert printed == [f"step {r['step']}: loss {r['loss']:.4f}" for r in steps]
    assert printed[0] == "step 1: loss 1.0000"
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["loss"] == "example-hinge" and run["status"] == "completed"


TSV = (
    "id\tprompt\tchosen\trejected\n"
    "1\tWhat is 2 plus 2?\\n\t4\t5\n"
    "\n"
    "2\tSay \"tab\": \tx\\ty\tx y\n"
    "3\tEmpty?\t \tno\n"
)


def test_tsv_files_are_read_by_suffix_with_lines_and_escapes(dpo_catalog, tmp_path):
    """Line 1 is the header (an extra ``id`` column, ignored); line 2 holds an escaped newline
    at the end of its prompt; line 3 is blank; line 4 an escaped tab (``x\\ty`` -> "x", tab,
    "y"); line 5 has a blank chosen completion: dropped and counted as ``empty``."""
    path = tmp_path / "pairs.tsv"
    path.write_text(TSV)
    stats = DataStats()
    pairs = load_pairs(path, dpo_catalog.formats, stats=stats)
    assert [(p.line, p.pair) for p in pairs] == [
        (2, dpo.PreferencePair("What is 2 plus 2?\n", "4", "5")),
        (4, dpo.PreferencePair('Say "tab": ', "x\ty", "x y")),
    ]
    assert stats.drops() == {"empty": 1}


@pytest.mark.parametrize("text, line, fragment", [
    ("prompt\tchosen\n", 1, "missing rejected"),
    ("prompt\tchosen\trejected\na\tb\n", 2, "2 fields, but the header names 3"),
    ("prompt\tchosen\trejected\na\tb\tc\\q\n", 2, "unknown escape \\q"),
    ("prompt\tchosen\trejected\n\na\tb\tc\\\n", 3, "lone backslash"),
])
def test_a_bad_tsv_file_is_one_error_naming_file_and_line(dpo_catalog, tmp_path, text, line,
                                                           fragment):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(dpo.DataError) as info:
        load_pairs(path, dpo_catalog.formats)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: example-tsv format: ") and fragment in message
    assert "\n" not in message


def test_forced_format_reads_any_file_name(dpo_catalog, tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("prompt\tchosen\trejected\np\tc\tr\n")
    [sourced] = load_pairs(path, dpo_catalog.formats, "example-tsv")
    assert sourced.pair == dpo.PreferencePair("p", "c", "r") and sourced.line == 2
    assert TSVFormat.suffixes == (".tsv",) and TSVFormat.reads_files()


def test_a_run_trains_on_a_tsv_file(dpo_plugin_manager, tmp_path):
    data = tmp_path / "pairs.tsv"
    data.write_text("prompt\tchosen\trejected\n"
                    + "".join(f"{i} + 1 = \t{i + 1}\t{i + 2}\n" for i in range(4)))
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(dpo_plugin_manager), [
        "run", "--no-progress", "--model", "tiny", "--data", str(data), "--backend", "cpu",
        "--max-steps", "1", "--batch-size", "4", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "data: 4 training pairs" in " ".join(result.output.split())
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
