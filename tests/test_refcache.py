"""Reference log-probs computed once before training and kept on disk (``dpo.core.training.refcache``,
``dpo precompute-ref``): the same numbers as a reference model in memory, reused across runs,
and never reused when stale."""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.training import refcache
from dpo.core.training.loop import TIMING_KEYS
from dpo.core.interfaces.plugins import get_plugin_manager
from dpo.core.model.tiny import build_tiny_model, build_tiny_tokenizer
from dpo.core.data.tokenization import TokenizedPair
from dpo.testing import write_arithmetic_pairs as write_pairs


@pytest.fixture
def cli():
    app = make_app(get_plugin_manager(load_entrypoints=False))

    def call(*args: str):
        return CliRunner().invoke(app, list(args))

    return call


def run_args(tmp_path: Path, out: str, *extra: str) -> list[str]:
    data = write_pairs(tmp_path / "pairs.jsonl")
    return ["run", "--no-progress", "--model", "tiny", "--data", str(data), "--backend", "cpu",
            "--max-steps", "4", "--lr", "1e-3", "--batch-size", "4", "--eval-fraction", "0.25",
            "--output", str(tmp_path / out), *extra]


def steps(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_run(a: Path, b: Path, tol: float = 1e-5, weight_tol: float = 1e-4) -> None:
    """Every metric of every step and evaluation within ``tol``, every final weight within
    ``weight_tol``: the two runs differ only in float rounding (the padding of the batch that
    scored a pair, or which tokens ran together). Adam divides by sqrt(v), which amplifies
    that rounding for weights whose gradients are nearly zero, but moves a weight by at most
    about lr (1e-3 here) per step; 1e-4 is a tenth of one step."""
    ra, rb = steps(a), steps(b)
    assert [sorted(r) for r in ra] == [sorted(r) for r in rb]
    for x, y in zip(ra, rb):
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=tol, abs=tol), key
    wa, wb = (load_file(p / "final" / "model.safetensors") for p in (a, b))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < weight_tol


def test_precomputed_reference_gives_the_run_of_a_reference_in_memory(tmp_path, cli):
    """The default (scored once, on disk) and --no-precompute-ref (a frozen copy scoring each
    batch) train to the same metrics and weights; the file holds all 24 pairs (18 training,
    6 held out), and run.json names it."""
    on = cli(*run_args(tmp_path, "on", "--ref-logps", str(tmp_path / "ref.safetensors")))
    assert on.exit_code == 0, on.output
    assert "reference log-probs: computing 24 pairs" in on.output
    off = cli(*run_args(tmp_path, "off", "--no-precompute-ref"))
    assert off.exit_code == 0, off.output
    assert_same_run(tmp_path / "on", tmp_path / "off")

    run = json.loads((tmp_path / "on" / "run.json").read_text())
    assert run["resolved"]["reference"].endswith(str(tmp_path / "ref.safetensors"))
    assert "in memory" in json.loads((tmp_path / "off" / "run.json").read_text())["resolved"]["reference"]
    table = refcache.read(tmp_path / "ref.safetensors")
    assert table is not None and len(table.values) == 24 and table.dtype == "float32"

    # A second run (another beta: the reference's log-probs do not depend on it) reads them all.
    again = cli(*run_args(tmp_path, "again", "--ref-logps", str(tmp_path / "ref.safetensors"),
                          "-o", "beta=0.5"))
    assert again.exit_code == 0, again.output
    assert "all 24 pairs read from" in again.output


def test_precompute_ref_command_then_run_reads_the_default_cache(tmp_path, cli, monkeypatch):
    """`dpo precompute-ref` with the run's data options fills the cache file a later
    `dpo run` finds by itself; the run then scores nothing."""
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    data = write_pairs(tmp_path / "pairs.jsonl")
    result = cli("precompute-ref", "--no-progress", "--model", "tiny", "--data", str(data),
                 "--eval-fraction", "0.25", "--backend", "cpu", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output[result.output.index("{"):])
    assert (info["pairs"], info["computed"], info["pairs_in_file"]) == (24, 24, 24)
    assert Path(info["path"]).is_file() and info["dtype"] == "float32"
    assert Path(info["path"]).parent == tmp_path / "cache" / "ref-logps"

    run = cli(*run_args(tmp_path, "out"))
    assert run.exit_code == 0, run.output
    assert f"reference log-probs: all 24 pairs read from {info['path']}" in run.output.splitlines()


def test_changed_pairs_are_scored_and_a_stale_file_is_rebuilt(tmp_path, cli):
    """A shorter --max-length changes some pairs' token ids: those are scored, the others
    read (prompts are 16 tiny-tokenizer tokens, completions 3 or 4 with the EOS, so 19 cuts
    only the 4-token ones). A file made with other reference weights is rebuilt (and says so), and the run
    equals one with that reference in memory."""
    path = tmp_path / "ref.safetensors"
    assert cli(*run_args(tmp_path, "a", "--ref-logps", str(path))).exit_code == 0
    short = cli(*run_args(tmp_path, "b", "--ref-logps", str(path), "--max-length", "19",
                          "--max-prompt-length", "16"))
    assert short.exit_code == 0, short.output
    assert "reference log-probs: computing" in short.output
    computed = int(short.output.split("computing ")[1].split()[0])
    assert 0 < computed < 24  # truncation changed some pairs' ids, not all
    assert len(refcache.read(path).values) == 24 + computed

    ref = tmp_path / "ref7"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=7).save_pretrained(ref)
    tokenizer.save_pretrained(ref)
    other = cli(*run_args(tmp_path, "c", "--ref-logps", str(path), "--ref-model", str(ref)))
    assert other.exit_code == 0, other.output
    assert (f"reference log-probs: {path} is stale (made with other reference weights); "
            "rebuilding it") in other.output.splitlines()
    assert len(refcache.read(path).values) == 24
    memory = cli(*run_args(tmp_path, "d", "--ref-model", str(ref), "--no-precompute-ref"))
    assert memory.exit_code == 0, memory.output
    assert_same_run(tmp_path / "c", tmp_path / "d")


def test_unreadable_file_in_the_cache_is_rebuilt_not_trusted(tmp_path, cli, monkeypatch):
    """A damaged file in dpo's own cache is rebuilt; a file of the user's named by --ref-logps
    that is not a table is refused and left as it was (it would be replaced)."""
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    first = cli(*run_args(tmp_path, "a"))
    assert first.exit_code == 0, first.output
    (cached,) = (tmp_path / "cache").rglob("*.safetensors")
    cached.write_bytes(b"not a table")
    result = cli(*run_args(tmp_path, "b"))
    assert result.exit_code == 0, result.output
    assert "computing 24 pairs" in result.output
    assert len(refcache.read(cached).values) == 24

    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"not a table")
    refused = cli(*run_args(tmp_path, "c", "--ref-logps", str(mine)))
    assert refused.exit_code == 2 and "not a reference log-prob file" in refused.output
    assert mine.read_bytes() == b"not a table" and not (tmp_path / "c").exists()


def test_digest_and_lookup():
    """The digest depends on every id and on where prompt ends and completion starts; lookup
    gives the batch's row order: every chosen log-prob, then every rejected one."""
    a = TokenizedPair((1, 2), (3,), (4,))
    assert refcache.pair_digest(a) == refcache.pair_digest(TokenizedPair((1, 2), (3,), (4,)))
    for other in (TokenizedPair((1,), (2, 3), (4,)), TokenizedPair((1, 2), (3,), (5,)),
                  TokenizedPair((1, 2), (4,), (3,))):
        assert refcache.pair_digest(other) != refcache.pair_digest(a)
    b = TokenizedPair((1, 2), (5,), (6,))
    table = refcache.RefLogps("m", "float32", {refcache.pair_digest(a): (-1.0, -2.0),
                                               refcache.pair_digest(b): (-3.0, -4.0)})
    assert table.lookup([a, b]).tolist() == [-1.0, -3.0, -2.0, -4.0]
    assert table.missing([a, TokenizedPair((9,), (9,), (8,)), a]) == [TokenizedPair((9,), (9,), (8,))]
    with pytest.raises(KeyError):
        table.lookup([TokenizedPair((9,), (9,), (8,))])


def test_model_digest_sees_every_weight():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    before = refcache.model_digest(model)
    assert refcache.model_digest(build_tiny_model(tokenizer, seed=0)) == before
    with torch.no_grad():
        next(reversed(list(model.parameters())))[0] += 1e-3
    assert refcache.model_digest(model) != before


def test_shared_prompt_run_equals_padded_run_and_starts_exactly_at_the_reference(tmp_path, cli,
                                                                               monkeypatch):
    """On CPU each pair's prompt runs once by default. Such a run trains to the metrics and
    weights of one over padded rows with a reference in memory; and since a pair's log-probs then do
    not depend on its batch, the precomputed reference equals the policy exactly at step 1:
    every reward is 0.0 (not 1e-7), the loss ln 2 to float32 rounding, no pair ranked right.
    (A fresh cache: values another run scored in other batches may differ by rounding.)"""
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    shared = cli(*run_args(tmp_path, "shared"))
    assert shared.exit_code == 0, shared.output
    # Padded rows with the reference in memory: there too a pair's reference and policy
    # log-probs come from the same batch, so both runs start from exact zeros.
    padded = cli(*run_args(tmp_path, "padded", "--no-share-prompt", "--no-precompute-ref"))
    assert padded.exit_code == 0, padded.output
    assert_same_run(tmp_path / "shared", tmp_path / "padded")
    first = next(r for r in steps(tmp_path / "shared") if "loss" in r)
    assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
    assert first["rewards/accuracies"] == 0.0
    run = json.loads((tmp_path / "shared" / "run.json").read_text())
    assert run["resolved"]["share_prompt"] is True
    assert json.loads((tmp_path / "padded" / "run.json").read_text())["resolved"]["share_prompt"] is False


def test_gradient_checkpointing_keeps_the_shared_prompt_and_the_run(tmp_path, cli, monkeypatch):
    """--gradient-checkpointing recomputes each layer in backward, the shared prompt's cache
    included: the run keeps sharing prompts and gives the run without checkpointing. The
    backend's ``release_memory`` is called before the replays (only with checkpointing)."""
    from dpo.backends.cpu import CPUBackend

    released = []
    monkeypatch.setattr(CPUBackend, "release_memory", lambda self: released.append(1))
    ok = cli(*run_args(tmp_path, "ok", "--share-prompt", "--gradient-checkpointing"))
    assert ok.exit_code == 0, ok.output
    assert released
    released.clear()
    resolved = json.loads((tmp_path / "ok" / "run.json").read_text())["resolved"]
    assert resolved["share_prompt"] is True
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert resolved["memory"] == "freed blocks of 1 MiB and more go back to the system"
    plain = cli(*run_args(tmp_path, "plain", "--share-prompt"))
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["resolved"]["memory"] is None
    assert plain.exit_code == 0, plain.output
    assert released == []
    assert_same_run(tmp_path / "ok", tmp_path / "plain")


def test_share_prompt_is_refused_where_checkpointing_cannot_keep_the_cache(tiny_model):
    """A model whose decoder layers cannot be found gets transformers' own checkpointing,
    which runs without the key/value cache: an explicit --share-prompt is refused with the
    reason, the default turns it off."""
    import copy

    from dpo.backends.cpu import CPUBackend
    from dpo.core.training.config import RunConfig
    from dpo.core.interfaces.errors import UsageError
    from dpo.core.training.setup import resolve_paths

    model = copy.deepcopy(tiny_model)
    model.get_decoder().layers = torch.nn.Sequential(*model.get_decoder().layers)
    backend = CPUBackend()
    ours = resolve_paths(RunConfig(gradient_checkpointing=True), backend, tiny_model)
    assert ours.shared_prompt and ours.layer_checkpointing
    theirs = resolve_paths(RunConfig(gradient_checkpointing=True), backend, model)
    assert not theirs.shared_prompt and not theirs.layer_checkpointing
    assert theirs.reasons()["layer_checkpointing"] == "no decoder layers to find"
    with pytest.raises(UsageError, match="--share-prompt: transformers' own activation "
                                         "checkpointing turns the key/value cache off"):
        resolve_paths(RunConfig(gradient_checkpointing=True, share_prompt=True), backend, model)


@pytest.mark.skipif(importlib.util.find_spec("intel_extension_for_pytorch") is not None,
                    reason="ipex.optimize rewrites the model that torch.compile would trace")
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="torch.compile's C++ backend (inductor) needs setuptools here")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_trains_like_eager(tmp_path, cli):
    """--compile (torch.compile of each decoder layer; the first steps compile, about 40 s for
    the tiny model on 2 cores) gives the eager run's metrics."""
    # Each run scores its own reference (with its own kernels), so both start exactly at it.
    compiled = cli(*run_args(tmp_path, "compiled", "--compile", "--max-steps", "2",
                             "--ref-logps", str(tmp_path / "compiled.safetensors")))
    assert compiled.exit_code == 0, compiled.output
    eager = cli(*run_args(tmp_path, "eager", "--max-steps", "2",
                          "--ref-logps", str(tmp_path / "eager.safetensors")))
    assert eager.exit_code == 0, eager.output
    for a, b in zip(steps(tmp_path / "compiled"), steps(tmp_path / "eager"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key
    assert json.loads((tmp_path / "compiled" / "run.json").read_text())["config"]["compile"] is True



def test_save_memory_leaves_a_threshold_the_user_set(monkeypatch):
    from dpo.backends.cpu import CPUBackend

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert CPUBackend().save_memory() is None


def test_compile_that_cannot_build_is_one_line_before_any_write(tmp_path, cli, monkeypatch):
    """Where torch.compile cannot build (no C++ compiler, no setuptools), --compile stops the
    run with torch's reason in one line before the output directory exists."""

    class Broken(RuntimeError):
        pass

    def compile_(fn, **kwargs):
        def run(*args):
            raise Broken("Compiler: cc is not found.\nSet CXX to a C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", compile_)
    result = cli(*run_args(tmp_path, "out", "--compile"))
    assert result.exit_code == 2
    assert ("--compile: torch.compile cannot build kernels here (Broken: Compiler: cc is not "
            "found.); install what it names, or run without --compile") in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_batch_cut_into_groups_trains_group_by_group_to_the_same_run(tmp_path, cli,
                                                                       monkeypatch):
    """Batches of three short pairs and one with a long completion: the shared prompt runs the
    odd pair apart, and training runs the two groups' forward and backward one after the
    other. The run equals one over padded rows with a reference in memory, and starts exactly
    at the reference (each group scored by the calls the reference pass made)."""
    import dpo.core.training.objectives as objectives

    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "odd.jsonl"
    with data.open("w") as fh:
        for i in range(16):
            long = i % 4 == 1
            chosen = " ".join(["yes"] * (60 if long else 1)) + f" {i}"
            fh.write(json.dumps({"prompt": f"Is {i} a number?", "chosen": chosen,
                                 "rejected": f"no {i}"}) + "\n")
    seen = []

    def spy(batch, paths):
        parts = real_parts(batch, paths)
        seen.append(len(parts))
        return parts

    real_parts = objectives.backward_parts
    monkeypatch.setattr(objectives, "backward_parts", spy)
    common = ["run", "--no-progress", "--model", "tiny", "--data", str(data), "--backend", "cpu",
              "--max-steps", "4", "--lr", "1e-3", "--batch-size", "4", "--no-shuffle",
              "--no-group-by-length"]
    grouped = cli(*common, "--output", str(tmp_path / "grouped"))
    assert grouped.exit_code == 0, grouped.output
    assert seen == [2, 2, 2, 2]
    padded = cli(*common, "--output", str(tmp_path / "padded"), "--no-share-prompt",
                 "--no-precompute-ref")
    assert padded.exit_code == 0, padded.output
    assert_same_run(tmp_path / "grouped", tmp_path / "padded")
    first = next(r for r in steps(tmp_path / "grouped") if "loss" in r)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    resolved = json.loads((tmp_path / "padded" / "run.json").read_text())["resolved"]
    assert resolved["packed_rows"] is False  # sdpa has no variable-length kernel
