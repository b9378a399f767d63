"""``benchmarks/sft_vs_dpo.py --quick`` end to end on the tiny model, so the benchmark cannot rot:
every stage runs as its own ``dpo`` process, every row is in the table with finite numbers, a
model that cannot load is reported as skipped (the run goes on), and the benchmark's rewards
and SFT loss are those ``dpo eval`` reports for the same models. Six stages, each a ``dpo``
process of its own: about 25 s on two idle cores."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from dpo.core.interfaces.plugins import collect, get_plugin_manager
from dpo.core.training.evaluation import EvalRequest, evaluate_request

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sft_vs_dpo.py"

pytest.importorskip("peft", reason="the lora extra (peft) is not installed")


def benchmark(monkeypatch):
    """The script as a module; what it adds to sys.path and sys.modules goes with the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("sft_vs_dpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_run_has_every_row_and_matches_dpo_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    bench = benchmark(monkeypatch)
    work = tmp_path / "work"
    rows = bench.main(["--quick", "--models", "tiny,./no-such-model", "--workdir", str(work),
                       "--json", str(tmp_path / "rows.json")])
    names = [s.name for s in bench.states(bench.QUICK.betas)]
    assert len(names) == 7
    tiny = [r for r in rows if r.model == "tiny"]
    assert [r.state for r in tiny] == names
    assert [r.skipped for r in tiny] == [None] * 7
    assert bench.finite(tiny)
    for r in tiny:
        assert r.held_out == bench.QUICK.held_out
        assert set(bench.METRICS) <= set(r.metrics)
        assert 0 <= r.rank_accuracy <= 1 and r.sft_loss > 0
        if r.state != "base":  # each trained state: its own process, timed and measured
            assert r.wall_s > 0 and r.peak_gib > 0
    base = tiny[0]  # against itself: no reward, no accuracy (ties do not count)
    assert base.metrics["rewards/accuracies"] == 0 and base.metrics["rewards/margins"] == 0
    assert {r.state: r.reference for r in tiny} == {
        "base": "base", "sft-full": "base", "sft-lora": "base",
        "dpo-full-b0.05": "sft-full", "dpo-full-b0.5": "sft-full",
        "dpo-lora-b0.05": "sft-lora", "dpo-lora-b0.5": "sft-lora"}
    # SFT on the chosen sides lowers the held-out SFT loss, even in three steps.
    assert tiny[1].sft_loss < base.sft_loss

    missing = [r for r in rows if r.model == "./no-such-model"]
    assert len(missing) == 7 and all("no such directory" in r.skipped for r in missing)

    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 14  # the header, then every row of both models
    assert "skipped ./no-such-model: UsageError: --model ./no-such-model: no such directory" in out
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == 14

    # The rewards are dpo eval's for the same policy against the same reference, and the SFT
    # loss is dpo eval --objective sft's.
    catalog = collect(get_plugin_manager(load_entrypoints=False))
    runs = work / "model-0"
    for row in (tiny[1], tiny[6]):  # full SFT, LoRA DPO
        result = evaluate_request(EvalRequest(
            model=str(runs / row.state / "final"), data=str(work / "held-out.jsonl"),
            format="hh", backend="cpu", objective="sft"), catalog)
        assert math.isclose(result["metrics"]["loss"], row.sft_loss, abs_tol=1e-5)
    for row in (tiny[4], tiny[5]):  # full and LoRA DPO
        result = evaluate_request(EvalRequest(
            model=str(runs / row.state / "final"), data=str(work / "held-out.jsonl"),
            ref=str(runs / row.reference / "final"), format="hh", backend="cpu",
            objective="dpo"), catalog)
        assert result["options"]["beta"] == row.beta and result["pairs"] == row.held_out
        for key in bench.METRICS:
            assert math.isclose(result["metrics"][key], row.metrics[key], abs_tol=1e-4), key
