"""The correctness contract of the speed paths (``dpo.core.model.paths``): which paths a model gets and
why, the check on real data that turns a wrong one off, dropout off for real, and the same rules
for the reference log-prob file, ``dpo eval`` and ``dpo precompute-ref``."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from dpo.cli import make_app
from dpo.core.model import paths as speed
from dpo.core.training import refcache
from dpo.core.model import verified
from dpo.core.data.batching import collate
from dpo.core.interfaces.errors import UsageError
from dpo.core.model.logps import batch_logps, shared_prompt_plan
from dpo.core.model.pathcheck import CHECK_ATOL, check
from dpo.core.model.paths import PLAIN, Paths, resolve, verified_paths
from dpo.core.interfaces.plugins import get_plugin_manager
from dpo.core.data.tokenization import TokenizedPair
from dpo.testing import write_arithmetic_pairs


@pytest.fixture
def cli(tmp_path, monkeypatch):
    # A cache of this test's own: runs here score on other paths than the suite's other runs,
    # and a shared reference file would carry their rounding into those.
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    app = make_app(get_plugin_manager(load_entrypoints=False))
    return lambda *args: CliRunner().invoke(app, list(args))


def mixed_pairs() -> list[TokenizedPair]:
    """Prompts of 2, 6 and 6 tokens, completions of 2 to 5: in one shared-prompt group the
    first pair's completions sit 4 cache slots past their positions."""
    return [TokenizedPair((5, 6), (7, 8, 9, 10, 11), (12, 13)),
            TokenizedPair((14, 15, 16, 17, 18, 19), (20, 21), (22, 23, 24)),
            TokenizedPair((25, 26, 27, 28, 29, 30), (31, 32, 33), (34, 35))]


def tiny_mistral(window: int | None):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=window, max_position_embeddings=128)
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


# -- what a model gets ---------------------------------------------------------------------

def test_a_verified_model_gets_every_path_and_the_run_options_take_some_away(tiny_model):
    assert verified_paths(tiny_model).used() == list(speed.SPEED_PATHS[:5]) + [
        "layer_checkpointing"]  # no variable-length kernel: no packed rows
    off_cpu = resolve(tiny_model, backend_name="cuda")
    assert off_cpu.used() == ["batched", "unmasked", "chunked_head", "tied_buffer"]
    assert "--share-prompt turns it on" in off_cpu.reasons()["shared_prompt"]
    cpu = resolve(tiny_model, share_prompt_default=True, backend_name="cpu")
    assert cpu.used() == ["batched", "unmasked", "chunked_head", "tied_buffer", "shared_prompt"]
    assert resolve(tiny_model, share_prompt=False).reasons()["shared_prompt"] == "--no-share-prompt"
    xla = resolve(tiny_model, static_shapes=True, backend_name="xla")
    assert xla.used() == [] and xla.static_shapes
    fsdp = resolve(tiny_model, share_prompt_default=True, sharded=True)
    assert not fsdp.shared_prompt and "fsdp" in fsdp.reasons()["shared_prompt"]


def test_a_model_not_proven_gets_the_plain_path_with_the_reason(tiny_model):
    """A subclass (as remote code or a user's own class would be), a type the table does not
    list, and a config value that changes the logits after the head: each path off, with why."""
    class Custom(type(tiny_model)):
        pass

    custom = Custom(tiny_model.config)
    assert verified_paths(custom).used() == []
    assert verified_paths(custom).reasons()["chunked_head"] == (
        "Custom comes from test_paths, not from transformers (remote code or a custom class): "
        "not verified")

    remote = copy.deepcopy(tiny_model)
    remote.__class__ = type("BtlmLMHeadModel", (type(tiny_model),),
                            {"__module__": "transformers_modules.btlm.modeling_btlm"})
    assert "remote code" in verified_paths(remote).reasons()["unmasked"]

    table = dict(verified.VERIFIED)
    del table["llama"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verified, "VERIFIED", table)
        assert verified_paths(tiny_model).reasons()["shared_prompt"] == (
            "model type 'llama' is not among the verified architectures")

    scaled = copy.deepcopy(tiny_model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(verified.VERIFIED, "llama",
                   verified.Arch(verified.ALL, neutral_head=(("logits_scaling", 1.0),)))
        scaled.config.logits_scaling = 8.0
        paths = verified_paths(scaled)
    assert paths.used() == ["batched", "unmasked", "layer_checkpointing"]
    assert paths.reasons()["chunked_head"].startswith("config logits_scaling = 8.0 changes")


def test_shared_prompt_groups_stay_within_the_attention_window():
    """Prompts 2, 6, 6; longest completions 5, 3, 3 (rows 7, 9, 9). Without a window one group:
    3 x 6 + 6 x 5 = 48 tokens. A window of 8: a group of different prompts must fit its
    longest prompt + longest completion in 8 tokens; pair 0 with either other needs 6 + 5 = 11,
    so it runs alone (2 + 2 x 5 = 12), pairs 1 and 2 share equal prompts (2 x 6 + 4 x 3 = 24):
    36 tokens in two groups. A window of 11 fits everything again."""
    prompts = (2, 6, 6) * 2
    rows = (7, 8, 9, 4, 9, 8)
    assert shared_prompt_plan(prompts, rows) == ([[0, 1, 2]], 48)
    assert shared_prompt_plan(prompts, rows, window=8) == ([[0], [1, 2]], 36)
    assert shared_prompt_plan(prompts, rows, window=11) == ([[0, 1, 2]], 48)


def test_a_sliding_window_keeps_the_shared_prompt_exact():
    """Mistral with a 4-token window: shared prompt within the window equals padded rows;
    the same groups without the window's constraint do not (completions 4 cache slots past
    their positions see other prompt tokens through the window)."""
    model = tiny_mistral(window=4)
    batch = collate(mixed_pairs(), pad_token_id=0)
    padded = Paths(batched=True, unmasked=True, chunked_head=True)
    assert resolve(model, share_prompt_default=True).window == 4
    with torch.no_grad():
        want = batch_logps(model, batch, padded)[0]
        within = batch_logps(model, batch, dataclasses.replace(padded, shared_prompt=True,
                                                                window=4))[0]
        unconstrained = batch_logps(model, batch, dataclasses.replace(padded, shared_prompt=True))[0]
    torch.testing.assert_close(within, want, rtol=1e-5, atol=1e-5)
    assert (unconstrained - want).abs().max() > 1e-2


# -- the check on real data ----------------------------------------------------------------

def test_a_logit_transform_nobody_declared_is_caught_and_its_paths_turned_off(tiny_model):
    """The head's output doubled by a hook (as a config value unknown to the table would do):
    the plain path sees it, the chunked projection (which reads the head's weight) does not.
    The check turns off chunked_head and the paths built on it, keeps unmasked, and what is
    left equals the plain path."""
    model = copy.deepcopy(tiny_model)
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: out * 2)
    batch = collate(mixed_pairs(), pad_token_id=0)
    paths = resolve(model, share_prompt_default=True)
    assert paths.used() == ["batched", "unmasked", "chunked_head", "tied_buffer", "shared_prompt"]
    checked, report = check(model, batch, paths)
    assert checked.used() == ["batched", "unmasked"]
    assert list(report.turned_off) == ["chunked_head"]
    assert report.max_difference > 100 * CHECK_ATOL
    assert checked.inexact == {"chunked_head"}
    assert "differed from the plain path's by" in checked.reasons()["chunked_head"]
    assert "needs chunked_head" in checked.reasons()["shared_prompt"]
    with torch.no_grad():
        torch.testing.assert_close(batch_logps(model, batch, checked)[0],
                                   batch_logps(model, batch, PLAIN)[0])
    assert speed.trusted(model, checked) == {"batched", "unmasked", "tied_buffer", "shared_prompt",
                                             "layer_checkpointing"}


def test_a_window_the_table_does_not_name_is_caught_by_the_check(monkeypatch):
    """Mistral's window left out of its entry: the shared prompt runs unconstrained, the check
    finds it nats off and turns off that one path."""
    model = tiny_mistral(window=4)
    monkeypatch.setitem(verified.VERIFIED, "mistral", verified.Arch(verified.ALL))
    paths = resolve(model, share_prompt_default=True)
    assert paths.shared_prompt and paths.window is None
    checked, report = check(model, collate(mixed_pairs(), pad_token_id=0), paths)
    assert checked.used() == ["batched", "unmasked", "chunked_head"]
    assert list(report.turned_off) == ["shared_prompt"]


def test_a_path_that_raises_is_turned_off(tiny_model, monkeypatch):
    import dpo.core.model.logps as logps_module

    def broken(*args, **kwargs):
        raise IndexError("no plain key/value cache")

    monkeypatch.setattr(logps_module, "shared_prompt_logps", broken)
    checked, report = check(tiny_model, collate(mixed_pairs(), pad_token_id=0),
                            resolve(tiny_model, share_prompt_default=True))
    assert checked.used() == ["batched", "unmasked", "chunked_head", "tied_buffer"]
    assert checked.reasons()["shared_prompt"].startswith("it failed to run this model")


def test_randomness_left_in_training_mode_is_refused(tiny_model):
    model = copy.deepcopy(tiny_model)
    layer = model.get_decoder().layers[0]
    layer.register_forward_hook(
        lambda m, i, out: out + torch.randn_like(out) * 0.1 if m.training else out)
    with pytest.raises(UsageError, match="different log-probs in training mode"):
        check(model, collate(mixed_pairs(), pad_token_id=0), resolve(model), training=True)


def test_an_exact_model_passes_the_check_at_the_cost_of_a_forward_per_row(tiny_model):
    calls = []
    tiny_model.get_decoder().register_forward_pre_hook(lambda *a: calls.append(1))
    paths = resolve(tiny_model, share_prompt_default=True)
    checked, report = check(tiny_model, collate(mixed_pairs(), pad_token_id=0), paths)
    assert checked == paths and report.turned_off == {} and report.max_difference < 1e-4
    # the plain path: each of the 6 rows alone; then the paths: prompts and completions
    assert len(calls) == 6 + 2


# -- dropout -------------------------------------------------------------------------------

def test_dropout_is_off_in_training_mode_and_a_saved_config_keeps_the_users(tmp_path):
    """A Llama with attention_dropout 0.3 (passed to the attention kernel in training mode,
    no nn.Dropout module anywhere): after disable_dropout two training-mode forwards agree and
    equal eval mode's; a saved checkpoint's config says 0.3, and training goes on at 0."""
    from transformers import AutoConfig

    from dpo.core.training.checkpoint import save_model_dir
    from dpo.core.model.dropout import disable_dropout
    from dpo.core.model.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.config.attention_dropout = 0.3
    for layer in model.get_decoder().layers:
        layer.self_attn.attention_dropout = 0.3
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is on
        disable_dropout(model)
        first, second = model(ids).logits, model(ids).logits
        model.eval()
        evaluated = model(ids).logits
    assert torch.equal(first, second) and torch.equal(first, evaluated)
    save_model_dir(tmp_path / "saved", model, tokenizer)
    assert AutoConfig.from_pretrained(tmp_path / "saved").attention_dropout == 0.3
    assert model.config.attention_dropout == 0.0


# -- runs, the reference file, eval and precompute-ref ---------------------------------------

def run_args(tmp_path, out, *extra):
    data = write_arithmetic_pairs(tmp_path / "pairs.jsonl")
    return ["run", "--no-progress", "--model", "tiny", "--data", str(data), "--backend", "cpu",
            "--max-steps", "2", "--batch-size", "4", "--eval-fraction", "0.25",
            "--output", str(tmp_path / out), *extra]


def test_a_run_says_which_paths_it_takes_and_what_the_check_found(tmp_path, cli):
    result = cli(*run_args(tmp_path, "out"))
    assert result.exit_code == 0, result.output
    text = result.output
    assert "policy speed paths: batched, unmasked, chunked_head, tied_buffer, shared_prompt" in text
    assert "checked against the plain path on 4 pairs" in text
    resolved = json.loads((tmp_path / "out" / "run.json").read_text())["resolved"]
    assert resolved["paths"]["used"] == ["batched", "unmasked", "chunked_head", "tied_buffer",
                                         "shared_prompt"]
    assert resolved["paths"]["off"]["packed_rows"].startswith("attention 'sdpa' has no")
    assert resolved["paths"]["check"]["pairs"] == 4
    assert resolved["paths"]["check"]["turned_off"] == {}
    assert resolved["reference_paths"] is None  # the policy's own


def test_share_prompt_asked_for_on_an_unverified_model_is_one_line(tmp_path, cli, monkeypatch):
    table = dict(verified.VERIFIED)
    del table["llama"]
    monkeypatch.setattr(verified, "VERIFIED", table)
    result = cli(*run_args(tmp_path, "out", "--share-prompt"))
    assert result.exit_code == 2
    assert "--share-prompt: model type 'llama' is not among the verified" in " ".join(
        result.output.split())
    assert not (tmp_path / "out").exists()
    plain = cli(*run_args(tmp_path, "plain"))
    assert plain.exit_code == 0, plain.output
    resolved = json.loads((tmp_path / "plain" / "run.json").read_text())["resolved"]
    assert resolved["paths"]["used"] == []
    # The same run on every path: the same numbers, to float rounding.
    monkeypatch.undo()
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    fast = cli(*run_args(tmp_path, "fast"))
    assert fast.exit_code == 0, fast.output
    from test_refcache import assert_same_run

    assert_same_run(tmp_path / "plain", tmp_path / "fast")


def test_a_reference_file_scored_on_a_path_later_found_wrong_is_rebuilt(tmp_path, cli,
                                                                         monkeypatch):
    path = tmp_path / "ref.safetensors"
    assert cli(*run_args(tmp_path, "a", "--ref-logps", str(path))).exit_code == 0
    assert refcache.read(path).meta["paths"] == "batched,unmasked,chunked_head,shared_prompt"
    again = cli(*run_args(tmp_path, "b", "--ref-logps", str(path)))
    assert "all 24 pairs read from" in again.output
    monkeypatch.setitem(verified.VERIFIED, "llama",
                        verified.Arch(verified.ALL - {"shared_prompt"}))
    rebuilt = cli(*run_args(tmp_path, "c", "--ref-logps", str(path)))
    assert rebuilt.exit_code == 0, rebuilt.output
    assert ("is stale (scored on the shared_prompt path, not exact for this model); "
            "rebuilding it") in rebuilt.output
    assert refcache.read(path).meta["paths"] == "batched,unmasked,chunked_head"
    # exact paths that round differently: a run without the shared prompt rebuilds it too,
    # and the default files are one per set of paths
    monkeypatch.undo()
    monkeypatch.setenv("DPO_CACHE_DIR", str(tmp_path / "cache"))
    shared = cli(*run_args(tmp_path, "d", "--ref-logps", str(path)))
    assert ("is stale (scored on batched, unmasked, chunked_head, this run takes batched, "
            "unmasked, chunked_head, shared_prompt, which round differently)"
            in shared.output)
    assert len(list((tmp_path / "cache" / "ref-logps").glob("*"))) == 0  # named file only
    assert cli(*run_args(tmp_path, "e")).exit_code == 0
    assert cli(*run_args(tmp_path, "f", "--no-share-prompt")).exit_code == 0
    assert len(list((tmp_path / "cache" / "ref-logps").glob("*.safetensors"))) == 2


def test_a_reference_file_of_format_1_is_rebuilt(tmp_path, cli):
    path = tmp_path / "ref.safetensors"
    assert cli(*run_args(tmp_path, "a", "--ref-logps", str(path))).exit_code == 0
    table = refcache.read(path)
    table.meta["version"] = "1"
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file(tensors, path, metadata={**table.meta, "version": "1"})
    result = cli(*run_args(tmp_path, "b", "--ref-logps", str(path)))
    assert "is stale (format version '1', not 2)" in result.output


def test_eval_and_precompute_take_and_say_the_same_paths(tmp_path, cli):
    assert cli(*run_args(tmp_path, "out")).exit_code == 0
    data = str(tmp_path / "pairs.jsonl")
    result = cli("eval", "--model", str(tmp_path / "out"), "--data", data, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.output[result.output.index("{"):])
    assert found["paths"] == {"policy": ["batched", "unmasked", "chunked_head", "tied_buffer",
                                         "shared_prompt"],
                              "reference": ["batched", "unmasked", "chunked_head", "tied_buffer",
                                            "shared_prompt"]}
    pre = cli("precompute-ref", "--model", "tiny", "--data", data, "--backend", "cpu",
              "--ref-logps", str(tmp_path / "r.safetensors"), "--json")
    assert pre.exit_code == 0, pre.output
    info = json.loads(pre.output[pre.output.index("{"):])
    assert info["paths"] == ["batched", "unmasked", "chunked_head", "tied_buffer", "shared_prompt"]


def test_dpo_paths_lists_the_verified_architectures_and_explains_one_model(cli):
    table = cli("paths", "--json")
    assert table.exit_code == 0, table.output
    rows = {r["model_type"]: r for r in json.loads(table.output)}
    assert len(rows) == len(verified.VERIFIED)
    assert rows["llama"]["paths"] == list(speed.SPEED_PATHS)
    assert rows["mistral"]["window"] == ["sliding_window"]
    assert rows["granite"]["neutral"] == {"logits_scaling": 1.0}

    one = cli("paths", "--model", "tiny", "--backend", "cpu", "--gradient-checkpointing",
              "--json")
    assert one.exit_code == 0, one.output
    found = json.loads(one.output)
    assert found["model_type"] == "llama" and found["verified_architecture"]
    assert [name for name, e in found["paths"].items() if e["on"]] == [
        "batched", "unmasked", "chunked_head", "tied_buffer", "shared_prompt",
        "layer_checkpointing"]
    assert found["paths"]["packed_rows"]["why_off"] == (
        "attention 'sdpa' has no variable-length kernel")
    text = cli("paths", "--model", "tiny", "--backend", "cpu", "--no-share-prompt")
    assert text.exit_code == 0 and "--no-share-prompt" in text.output
    bad = cli("paths", "--model", "no/such/dir/at/all")
    assert bad.exit_code == 2 and "no such directory" in bad.output
