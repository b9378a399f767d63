"""Reference-free losses (simpo, orpo, sft, cpo) run end to end with no reference at all: no second
model in memory, no reference forward pass, no reference log-prob file; the run says so, flags
that only mean something with a reference are refused, and ``dpo eval`` of such a run works."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import dpo.core.training.objectives as objectives
import dpo.core.training.refcache as refcache
import dpo.core.training.run as run_module
from dpo.core.model.flops import FlopCounter

FREE = ("simpo", "orpo", "sft", "cpo")
EXAMPLE_PAIRS = Path(__file__).resolve().parent.parent / "examples" / "pairs.jsonl"


def run_args(output: Path, loss: str, *extra: str) -> list[str]:
    return ["run", "--model", "tiny", "--data", str(EXAMPLE_PAIRS), "--loss", loss,
            "--max-steps", "2", "--batch-size", "4", "--output", str(output), *extra]


def one_line_error(result, *fragments: str) -> str:
    """The result is exit 2 with one line, ``error: ...``, holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def watched(monkeypatch):
    """What a run does that would mean a reference: models deep-copied, models loaded, the
    reference log-prob cache asked for, models scored by the objective, FLOPs counted with a
    reference forward; and the recipe as it hands the loop its inputs."""
    seen: dict = {"copied": [], "loaded": [], "scored": [], "reference_forward": [],
                  "recipe": None}

    real_deepcopy = copy.deepcopy

    def deepcopy(obj, memo=None, _nil=[]):  # noqa: B006 - copy.deepcopy's own signature
        if isinstance(obj, torch.nn.Module):
            seen["copied"].append(type(obj).__name__)
        return real_deepcopy(obj, memo)

    monkeypatch.setattr(copy, "deepcopy", deepcopy)

    real_load = run_module.load_model

    def load_model(spec, *args, **kwargs):
        seen["loaded"].append(spec)
        return real_load(spec, *args, **kwargs)

    monkeypatch.setattr(run_module, "load_model", load_model)

    def no_cache(*args, **kwargs):
        raise AssertionError("the reference log-prob cache was asked for")

    monkeypatch.setattr(refcache, "ensure", no_cache)

    real_logps = objectives.model_logps

    def model_logps(model, batch, paths):
        seen["scored"].append(model)
        return real_logps(model, batch, paths)

    monkeypatch.setattr(objectives, "model_logps", model_logps)

    real_step = FlopCounter.train_step

    def train_step(self, row_lengths, completion_tokens, reference_forward):
        seen["reference_forward"].append(reference_forward)
        return real_step(self, row_lengths, completion_tokens, reference_forward)

    monkeypatch.setattr(FlopCounter, "train_step", train_step)

    real_trainee = run_module.Recipe.trainee

    def trainee(self):
        seen["recipe"] = self
        return real_trainee(self)

    monkeypatch.setattr(run_module.Recipe, "trainee", trainee)
    return seen


@pytest.mark.parametrize("loss", FREE)
def test_a_reference_free_run_has_no_reference_anywhere(loss, invoke, tmp_path, watched):
    """Two steps of each reference-free loss: one model loaded (the policy), none copied, the
    recipe and the objective hold no reference, every scored forward is the policy's, no step
    counts a reference forward, no reference log-prob file exists, and run.json and the log
    say the reference is none."""
    out = tmp_path / "out"
    result = invoke(*run_args(out, loss))
    assert result.exit_code == 0, result.output

    assert watched["loaded"] == ["tiny"]
    assert watched["copied"] == []
    recipe = watched["recipe"]
    assert recipe.reference is None and recipe.ref_source is None
    assert recipe.ref_table is None and recipe.ref_path is None and not recipe.base_reference
    objective = recipe.objective()
    assert objective.models() == [] and objective.reference is None
    policy = run_module.strat.unwrap(recipe.trained)
    assert watched["scored"] and all(m is policy for m in watched["scored"])
    assert watched["reference_forward"] and not any(watched["reference_forward"])

    cache = Path(tmp_path / "cache")  # the `invoke` fixture's DPO_CACHE_DIR
    assert not (cache / "ref-logps").exists()

    record = json.loads((out / "run.json").read_text())
    resolved = record["resolved"]
    assert resolved["reference"].startswith("none (reference-free loss")
    assert resolved["reference_logps"] is None and resolved["reference_paths"] is None
    assert record["config"]["loss"] == loss
    assert f"loss {loss} (reference-free: no reference model" in result.output
    assert "reference log-probs:" not in result.output  # what a reference pass says

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"step"' in line and '"loss"' in line]
    assert steps and all(math.isfinite(s["loss"]) for s in steps)
    if loss == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(steps[-1])


def test_eval_of_a_reference_free_run(invoke, tmp_path):
    """`dpo eval` of a simpo run takes the run's loss and needs no reference; giving one is a
    one-line error."""
    out = tmp_path / "out"
    assert invoke(*run_args(out, "simpo", "-o", "gamma=0.25")).exit_code == 0
    result = invoke("eval", "--model", str(out), "--data", str(EXAMPLE_PAIRS), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{"):])
    assert info["loss"] == "simpo" and info["ref"] is None
    assert info["options"] == {"beta": 2.0, "gamma": 0.25}
    assert list(info["paths"]) == ["policy"]
    assert math.isfinite(info["metrics"]["loss"])

    one_line_error(invoke("eval", "--model", str(out), "--data", str(EXAMPLE_PAIRS),
                          "--ref", "tiny"), "--ref", "'simpo'", "no reference")


@pytest.mark.parametrize("flag", [["--ref-model", "tiny"], ["--ref-logps", "REF"]],
                         ids=["ref-model", "ref-logps"])
@pytest.mark.parametrize("loss", FREE)
def test_reference_flags_with_a_reference_free_loss_are_refused(loss, flag, invoke, tmp_path):
    """--ref-model and --ref-logps mean nothing without a reference: a one-line error, exit 2,
    and nothing written (no output directory, no log-prob file)."""
    out = tmp_path / "out"
    flag = [str(tmp_path / "ref.safetensors") if f == "REF" else f for f in flag]
    one_line_error(invoke(*run_args(out, loss, *flag)), flag[0], repr(loss))
    assert not out.exists()
    assert not (tmp_path / "ref.safetensors").exists()


def test_precompute_ref_with_a_reference_free_loss_is_refused(invoke, tmp_path):
    """`dpo precompute-ref` takes the loss from a run's config file: a reference-free one has
    nothing to precompute (exit 2, one line, no file). It has no --loss flag of its own."""
    config = tmp_path / "run.toml"
    config.write_text('loss = "simpo"\n')
    one_line_error(invoke("precompute-ref", "--config", str(config), "--model", "tiny",
                          "--data", str(EXAMPLE_PAIRS)), "'simpo'", "nothing to precompute")
    assert not (tmp_path / "cache" / "ref-logps").exists()
    one_line_error(invoke("precompute-ref", "--loss", "simpo"), "--loss")
