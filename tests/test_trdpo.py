"""TR-DPO (``--ref-update-steps``, ``--ref-update-alpha``): the reference model moves toward the
policy every N optimizer steps (Gorbatovski et al. 2024, arXiv:2404.09656, Eqs. 4-5).

The update rule on a hand-built module (golden values derived below), the schedule in a real
run read back from its checkpoints, exact resume, and the one-line refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpo
from dpo.core.interfaces.errors import UsageError
from dpo.core.model.tiny import build_tiny_model, build_tiny_tokenizer, tiny_config
from dpo.core.training import refupdate
from dpo.core.training.checkpoint import MANIFEST, verify
from dpo.core.training.loop import TIMING_KEYS
from dpo.testing import CrashAt, command_line, plugin_of
from test_cli import assert_one_line_error


class NoReference(dpo.Loss):
    """A reference-free loss: TR-DPO has nothing to update with it."""

    name = "no-ref-tr"
    requires_reference = False

    def __call__(self, logps):  # never reached: the run is refused before training
        raise AssertionError


@pytest.fixture
def cli(monkeypatch, tmp_path):
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    return command_line(plugin_of(CrashAt, NoReference))


# -- the update rule ---------------------------------------------------------------------------

class Toy(torch.nn.Module):
    """A linear layer, a weight tied under two names (as an output head is tied to the input
    embeddings), and a buffer."""

    def __init__(self, w: list[float], b: float, tied: float, buf: float):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)
        self.embed = torch.nn.Parameter(torch.tensor([tied]))
        self.head = torch.nn.Module()
        self.head.weight = self.embed  # the same Parameter under a second name
        self.register_buffer("scale", torch.tensor([buf]))
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([w]))
            self.linear.bias.fill_(b)


def test_soft_update_golden_values():
    """alpha = 0.25, reference <- 0.25 * policy + 0.75 * reference, weight by weight:
    weight [5, -1] toward [1, 3]: [0.25*1 + 0.75*5, 0.25*3 + 0.75*(-1)] = [4.0, 0.0];
    bias -2 toward 2: 0.25*2 + 0.75*(-2) = -1.0;
    the tied weight 4 toward 0: 0.25*0 + 0.75*4 = 3.0 (mixed once; twice would give 2.25);
    the buffer is copied: 7.0. The policy is left as it was."""
    policy = Toy([1.0, 3.0], 2.0, tied=0.0, buf=7.0)
    reference = Toy([5.0, -1.0], -2.0, tied=4.0, buf=0.0)
    refupdate.mix_(reference, policy, 0.25)
    assert reference.linear.weight.tolist() == [[4.0, 0.0]]
    assert reference.linear.bias.tolist() == [-1.0]
    assert reference.embed.tolist() == [3.0] and reference.head.weight is reference.embed
    assert reference.scale.tolist() == [7.0]
    assert policy.linear.weight.tolist() == [[1.0, 3.0]] and policy.embed.tolist() == [0.0]


def test_the_schedule_updates_after_every_nth_step_and_alpha_one_copies():
    """every = 2, alpha = 0.25 over steps 1..4: updates after steps 2 and 4 only. The weight's
    first entry 5 toward 1: after step 2, 0.25*1 + 0.75*5 = 4.0; after step 4,
    0.25*1 + 0.75*4 = 3.25. Then alpha = 1: a copy, 1.0."""
    policy = Toy([1.0, 3.0], 2.0, tied=0.0, buf=7.0)
    reference = Toy([5.0, -1.0], -2.0, tied=4.0, buf=0.0)
    update = refupdate.ReferenceUpdate(reference, every=2, alpha=0.25)
    ran = [update.after_step(policy, step) for step in (1, 2, 3, 4)]
    assert ran == [False, True, False, True]
    assert reference.linear.weight[0, 0].item() == 3.25
    refupdate.ReferenceUpdate(reference, every=1, alpha=1.0).after_step(policy, 5)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                 policy.state_dict().values()))


def test_saved_reference_weights_load_back_with_the_tied_name_filled_in(tmp_path):
    from dpo.core.training.distributed import DistInfo

    tokenizer = build_tiny_tokenizer()
    policy, reference = build_tiny_model(tokenizer, seed=1), build_tiny_model(tokenizer, seed=2)
    update = refupdate.ReferenceUpdate(reference, every=1, alpha=0.5)
    update.after_step(policy, 1)
    state = update.state_dict(DistInfo())
    assert "lm_head.weight" not in state  # tied to the embeddings: saved once
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / refupdate.REFERENCE_WEIGHTS))
    fresh = build_tiny_model(tokenizer, seed=3)
    refupdate.load_reference(fresh, tmp_path / refupdate.REFERENCE_WEIGHTS)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 reference.state_dict().values()))


# -- in a run ----------------------------------------------------------------------------------

def run_args(pairs: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", "tiny", "--data", str(pairs), "--backend", "cpu",
            "--batch-size", "4", "--lr", "1e-2", "--scheduler", "constant", "--seed", "3",
            "--output", str(out), *extra]


def steps(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_hard_update_makes_the_reference_the_policy_of_step_n(cli, pairs, tmp_path):
    """N = 2, alpha = 1, a checkpoint every step. checkpoint-1's reference is still the initial
    model (the policy has moved); checkpoint-2's equals that step's policy bit for bit;
    checkpoint-3's is still step 2's policy. Step 3 starts with policy == reference, so its
    rewards (beta * (policy - reference) log-prob) are 0 and its loss is ln 2."""
    out = tmp_path / "out"
    result = cli(*run_args(pairs, out, "--max-steps", "3", "--save-steps", "1",
                           "--save-total-limit", "3", "--ref-update-steps", "2"))
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert ("TR-DPO: the reference is updated from the policy every 2 steps (alpha 1); it stays "
            "in memory, its log-probs are not precomputed") in said
    ck = {n: (load_file(out / f"checkpoint-{n}" / "model.safetensors"),
              load_file(out / f"checkpoint-{n}" / refupdate.REFERENCE_WEIGHTS)) for n in (1, 2, 3)}
    initial = build_tiny_model(build_tiny_tokenizer(), seed=3).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(ck[1][1][name], initial[name])
    assert not torch.equal(ck[1][0][name], initial[name])
    assert ck[2][1].keys() == ck[2][0].keys()
    assert all(torch.equal(ck[2][1][k], ck[2][0][k]) for k in ck[2][0])
    assert all(torch.equal(ck[3][1][k], ck[2][0][k]) for k in ck[2][0])
    assert not torch.equal(ck[3][0][name], ck[2][0][name])
    third = [r for r in steps(out) if r["step"] == 3 and "loss" in r][0]
    assert abs(third["rewards/chosen"]) < 1e-6 and abs(third["rewards/rejected"]) < 1e-6
    assert third["loss"] == pytest.approx(math.log(2), abs=1e-6)
    second = [r for r in steps(out) if r["step"] == 2 and "loss" in r][0]
    assert abs(second["rewards/chosen"]) > 1e-4  # before the update, the policy had moved
    listed = json.loads((out / "checkpoint-2" / MANIFEST).read_text())["files"]
    assert refupdate.REFERENCE_WEIGHTS in listed and verify(out / "checkpoint-2") is None
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["precompute_ref"] is False  # turned off, not asked for
    # Extended without TR-DPO, its updated reference cannot be replaced by precomputed
    # log-probs (of the initial model): refused before anything changes.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    extended = cli("run", "--resume", str(out), "--max-steps", "4", "--ref-update-steps", "0",
                   "--precompute-ref")
    assert_one_line_error(extended, 2, "checkpoint-3 holds the reference model that TR-DPO "
                          "updated (reference.safetensors)", "resume with --no-precompute-ref")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert record["resolved"]["reference_update"]["every_steps"] == 2
    assert record["resolved"]["reference"].startswith(
        "a copy of --model, in memory, updated every 2 steps (TR-DPO, alpha 1)")


def test_resume_after_a_crash_equals_an_uninterrupted_run(cli, pairs, tmp_path):
    """Soft updates (alpha 0.5) after steps 2 and 4 of 5; the crashed run dies at step 3, after
    checkpoint-2 (whose reference is half the initial model, half step 2's policy), and resumes
    from it: every step's metrics and the final weights equal the uninterrupted run's."""
    common = ["--max-steps", "5", "--save-steps", "2", "--ref-update-steps", "2",
              "--ref-update-alpha", "0.5", "--stop", "crash-at"]
    straight = cli(*run_args(pairs, tmp_path / "straight", *common))
    assert straight.exit_code == 0, straight.output
    CrashAt.armed_at = 3
    crashed = cli(*run_args(pairs, tmp_path / "crashed", *common))
    assert crashed.exit_code == 1 and CrashAt.armed_at is None
    resumed = cli("run", "--resume", str(tmp_path / "crashed"))
    assert resumed.exit_code == 0, resumed.output
    assert "reference weights (TR-DPO) restored from" in " ".join(resumed.output.split())
    assert steps(tmp_path / "crashed") == steps(tmp_path / "straight")
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "crashed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- refusals ----------------------------------------------------------------------------------

def different_model(directory: Path) -> Path:
    """The tiny model made wider (96 instead of 64): same tokenizer, another architecture."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer)
    config.hidden_size = 96
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("extra, fragments", [
    (["--precompute-ref"], ["--precompute-ref=True: TR-DPO (--ref-update-steps) updates the "
                            "reference model during training", "--no-precompute-ref"]),
    (["--ref-logps", "ref.pt"], ["--ref-logps reads reference log-probs computed before "
                                 "training", "give one of them"]),
    (["--lora"], ["--ref-update-steps with --lora: a LoRA run's reference is its base model"]),
    (["--loss", "no-ref-tr"], ["--ref-update-steps: loss 'no-ref-tr' uses no reference model"]),
    (["--ref-update-alpha", "0"], ["--ref-update-alpha=0.0: Input should be greater than 0"]),
    (["--ref-update-alpha", "1.5"], ["--ref-update-alpha=1.5: Input should be less than or "
                                     "equal to 1"]),
    (["--ref-model", "WIDER"], ["has another architecture than --model tiny",
                                "model.embed_tokens.weight is (320, 64) in --model and (320, "
                                "96) in --ref-model"]),
], ids=["precompute-ref", "ref-logps", "lora", "reference-free", "alpha-0", "alpha-1.5",
        "other-architecture"])
def test_what_trdpo_cannot_run_with_is_one_line_and_writes_nothing(cli, pairs, tmp_path, extra,
                                                                  fragments):
    if "WIDER" in extra:
        extra = [str(different_model(tmp_path / "wider")) if e == "WIDER" else e for e in extra]
    out = tmp_path / "out"
    result = cli(*run_args(pairs, out, "--max-steps", "1", "--ref-update-steps", "2", *extra))
    assert_one_line_error(result, 2, *fragments)
    assert not out.exists()


def test_precompute_ref_in_a_config_file_is_refused_at_its_line(cli, pairs, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("max_steps = 1\nprecompute_ref = true\n")
    out = tmp_path / "out"
    result = cli(*run_args(pairs, out, "--config", str(config), "--ref-update-steps", "2"))
    assert_one_line_error(result, 2, f"{config}:2: precompute-ref = true: TR-DPO",
                          "fix it in the config file")
    assert not out.exists()


def test_sft_takes_no_reference_update(cli, tmp_path):
    result = cli("sft", "--model", "tiny", "--ref-update-steps", "2",
                 "--output", str(tmp_path / "out"))
    assert_one_line_error(result, 2, "No such option: --ref-update-steps")


def test_the_config_turns_precomputation_off_only_where_not_asked_for():
    from dpo.core.training.config import RunConfig

    assert RunConfig(ref_update_steps=3).precompute_ref is False
    assert RunConfig().precompute_ref is True
    assert RunConfig(ref_update_steps=3, precompute_ref=False).precompute_ref is False
    with pytest.raises(ValueError, match="TR-DPO"):
        RunConfig(ref_update_steps=3, precompute_ref=True)
    with pytest.raises(UsageError, match="another architecture"):
        tokenizer = build_tiny_tokenizer()
        config = tiny_config(tokenizer)
        config.intermediate_size = 64
        from transformers import AutoModelForCausalLM

        refupdate.same_architecture(build_tiny_model(tokenizer),
                                    AutoModelForCausalLM.from_config(config), "a", "b")


# -- several processes -------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_update_their_reference_like_one_process(tmp_path, strategy):
    """Soft updates after every step on 2 ranks (DDP: each its replica; FSDP2: each its local
    shards) against one process with the same global batch: each step's metrics within
    test_distributed's tolerances, and checkpoint-3's reference weights within its weight
    tolerance (summation order only differs)."""
    from test_distributed import (COMMON, WEIGHT_TOL, assert_metrics_close, dpo_run,
                                  write_pairs)

    write_pairs(tmp_path / "pairs.jsonl")
    trdpo = [*COMMON, "--data", "pairs.jsonl", "--ref-update-steps", "1",
             "--ref-update-alpha", "0.5"]
    one = dpo_run(*trdpo, "--batch-size", "4", "--output", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = dpo_run(*trdpo, "--batch-size", "2", "--nproc", "2", "--strategy", strategy,
                  "--output", "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_metrics_close(tmp_path / "one", tmp_path / "two")
    a, b = (load_file(tmp_path / run / "checkpoint-3" / refupdate.REFERENCE_WEIGHTS)
            for run in ("one", "two"))
    initial = build_tiny_model(build_tiny_tokenizer(), seed=42).state_dict()
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_TOL
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # the updates happened
