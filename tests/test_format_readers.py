"""Data formats that read files of their own (``DataFormat.read`` and ``suffixes``): dispatch by
suffix or ``--format``, JSONL untouched, the reader's errors as one line with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dpo
from dpo.core.interfaces.data_format import DataFormat
from dpo.core.data.reading import load_pairs
from dpo.core.interfaces.errors import DataError, UsageError
from dpo.core.interfaces.plugins import collect, get_plugin_manager, register_plugin
from dpo.core.interfaces.registry import Registry
from dpo.plugins.formats.preference import PreferenceFormat
from dpo.testing import plugin_of


class PipeFormat(DataFormat):
    """``prompt|chosen|rejected`` per line. A line starting ``!`` is refused with its line; one
    starting ``?`` makes the reader fail the way a buggy third-party reader would."""

    name = "pipes"
    suffixes = (".psv", ".pipes.txt")

    @classmethod
    def detect(cls, record):
        return False

    @classmethod
    def read(cls, path):
        for line, text in enumerate(Path(path).read_text().splitlines(), start=1):
            if text.startswith("!"):
                raise dpo.DataError("a line may not start with '!'", line=line)
            if text.startswith("?"):
                {}["boom"]
            if text:
                prompt, chosen, rejected = text.split("|")
                yield line, {"p": prompt, "c": chosen, "r": rejected}

    def parse(self, record):
        return dpo.PreferencePair(record["p"], record["c"], record["r"])


def formats(*extra: type[DataFormat]) -> Registry[DataFormat]:
    registry: Registry[DataFormat] = Registry("data format", DataFormat)
    for cls in (PreferenceFormat, PipeFormat, *extra):
        registry.add(cls, provider=cls.__name__)
    return registry


def test_a_file_whose_suffix_a_format_claims_is_read_by_that_format(tmp_path):
    """Lines 1 and 3 hold pairs, line 2 is blank: two pairs, numbered by their lines."""
    for name in ("pairs.psv", "PAIRS.Pipes.TXT"):
        path = tmp_path / name
        path.write_text("a|b|c\n\nd|e|f\n")
        assert [(s.line, s.pair) for s in load_pairs(path, formats())] == [
            (1, dpo.PreferencePair("a", "b", "c")), (3, dpo.PreferencePair("d", "e", "f"))]


def test_jsonl_stays_jsonl_and_format_forces_the_reader(tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    [sourced] = load_pairs(jsonl, formats())
    assert sourced.pair == dpo.PreferencePair("p", "c", "r")

    other = tmp_path / "pairs.txt"
    other.write_text("x|y|z\n")
    [sourced] = load_pairs(other, formats(), "pipes")
    assert sourced.pair == dpo.PreferencePair("x", "y", "z")
    # A JSON format forced on a claimed suffix reads it as JSONL.
    with pytest.raises(DataError, match=r"pairs.psv:1: invalid JSON"):
        (tmp_path / "pairs.psv").write_text("x|y|z\n")
        load_pairs(tmp_path / "pairs.psv", formats(), "preference")


@pytest.mark.parametrize("text, expected", [
    ("a|b|c\n!x\n", "{path}:2: pipes format: a line may not start with '!'"),
    # The reader names no line: the one after the last record read (2) is named.
    ("a|b|c\n?\n", "{path}:2: pipes format cannot read it (KeyError: 'boom')"),
    ("a|b\n", "{path}:1: pipes format cannot read it (ValueError: not enough values to unpack "
              "(expected 3, got 2))"),
])
def test_errors_from_a_reader_are_one_line_with_file_and_line(tmp_path, text, expected):
    path = tmp_path / "bad.psv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_pairs(path, formats())
    assert str(info.value) == expected.format(path=path)
    assert info.value.__suppress_context__  # no chained traceback behind the line


def test_a_reader_yielding_the_wrong_shape_is_named(tmp_path):
    class Sloppy(PipeFormat):
        name = "sloppy"
        suffixes = (".sloppy",)

        @classmethod
        def read(cls, path):
            yield {"p": "a"}

    path = tmp_path / "x.sloppy"
    path.write_text("anything\n")
    with pytest.raises(DataError, match=r"x.sloppy:1: sloppy format: read\(\) must yield "
                                        r"\(line number, dict\) pairs, got dict"):
        load_pairs(path, formats(Sloppy))


def test_a_missing_file_with_a_claimed_suffix_is_not_looked_up_on_the_hub(tmp_path):
    missing = tmp_path / "nope.psv"
    with pytest.raises(DataError) as info:
        load_pairs(missing, formats())
    assert str(info.value) == f"{missing}: no such file; check the path given to --data"


def test_two_formats_claiming_one_suffix_ask_for_format(tmp_path):
    class Rival(PipeFormat):
        name = "rival"

    path = tmp_path / "x.psv"
    path.write_text("a|b|c\n")
    with pytest.raises(UsageError, match="data formats pipes, rival all read files named like "
                                         "this; pick one with --format"):
        load_pairs(path, formats(Rival))
    assert load_pairs(path, formats(Rival), "rival")[0].pair.prompt == "a"


@pytest.mark.parametrize("attributes, problem", [
    ({"suffixes": (".x",)}, "claims the suffixes .x but does not implement read(path)"),
    ({"suffixes": ("x",), "read": PipeFormat.read}, "suffixes must be a tuple of lower-case"),
    ({"suffixes": ".x", "read": PipeFormat.read}, "suffixes must be a tuple of lower-case"),
])
def test_a_format_with_broken_reader_declarations_is_refused_at_registration(attributes, problem):
    cls = type("Broken", (PreferenceFormat,), {"name": "broken", **attributes})

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, plugin_of(cls), "broken-formats")
    assert "broken" not in collect(pm).formats
    [failure] = pm.failures
    assert failure.name == "broken-formats" and problem in failure.error


def test_a_run_trains_on_a_file_a_plugin_format_reads(tmp_path):
    from typer.testing import CliRunner

    from dpo.cli import make_app

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, plugin_of(PipeFormat), "pipes-plugin")
    data = tmp_path / "pairs.psv"
    data.write_text("".join(f"{i} + 1 = |{i + 1}|{i + 2}\n" for i in range(4)))
    out = tmp_path / "out"
    result = CliRunner().invoke(make_app(pm), [
        "run", "--model", "tiny", "--data", str(data), "--max-steps", "1", "--output", str(out),
        "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "data: 4 training pairs" in " ".join(result.output.split())
