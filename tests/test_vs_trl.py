"""The pure parts of benchmarks/vs_trl.py: the random models' shapes and the FLOP and MFU
arithmetic (no TRL, no GPU, no child processes)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dpo.core.model.flops import FlopCounter

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py"


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_vocabulary_rounds_up_to_a_multiple_of_64(vs_trl):
    assert vs_trl.round_up(49152) == 49152
    assert vs_trl.round_up(49153) == 49216
    assert vs_trl.round_up(1) == 64


def test_llama_1b_config(vs_trl):
    config = vs_trl.random_model_config("llama-1b", 49152, 1, 2, 2)
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "intermediate_size",
                                   "tie_word_embeddings", "vocab_size")} == {
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 8192, "tie_word_embeddings": False,
        "vocab_size": 49152}
    assert config["rope_parameters"]["rope_theta"] == 500000.0
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert vs_trl.llama_parameters(config) == 1_174_472_704  # "1B-class": 1.17B


@pytest.mark.parametrize("preset", ["llama-1b", "tiny"])
def test_parameter_count_matches_the_built_model(vs_trl, preset):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = vs_trl.random_model_config(preset, 49155, 0, 0, None)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = LlamaForCausalLM(LlamaConfig(**config))
    assert config["vocab_size"] == 49216
    assert sum(p.numel() for p in model.parameters()) == vs_trl.llama_parameters(config)
    assert model.config.rope_parameters["rope_theta"] == vs_trl.RANDOM_MODELS[preset][
        "rope_theta"]


def test_tiny_is_a_few_million_parameters(vs_trl):
    config = vs_trl.random_model_config("tiny", 49152, 1, 2, 2)
    assert 1e6 < vs_trl.llama_parameters(config) < 1e7


def test_trl_step_flops_count_the_reference_forward(vs_trl):
    counter = FlopCounter(body_params=1000, head_params=100, layers=2, attention_width=8)
    rows, completion = [[10, 20], [5, 5]], [12, 4]
    flops = vs_trl.trl_step_flops(counter, rows, completion)
    forward = [2 * 1000 * 30 + 2 * 2 * 8 * (100 + 400) + 2 * 100 * 12,
               2 * 1000 * 10 + 2 * 2 * 8 * (25 + 25) + 2 * 100 * 4]
    assert flops == [4 * f for f in forward]


def _result(vs_trl, side, times, flops, peak_device=None):
    return vs_trl.ChildResult(side=side, step_times=times, real_tokens=[100] * len(times),
                              padded_tokens=[120] * len(times), losses=[0.69] * len(times),
                              first_step={k: 0.5 for k in vs_trl.METRICS},
                              peak_rss_bytes=2**30, wall_s=10.0, step_flops=flops,
                              peak_device_bytes=peak_device)


def test_mfu_leaves_out_the_warm_up_step_and_divides_by_the_peak(vs_trl):
    ours = _result(vs_trl, "ours", [5.0, 1.0, 1.0], [9e12, 4e12, 4e12], 3 * 2**30)
    trl = _result(vs_trl, "trl", [5.0, 2.0, 2.0], [9e12, 6e12, 6e12], 6 * 2**30)
    setup = {"device": "cuda", "dtype": "bfloat16", "gpu": "Some GPU", "peak_flops": 10e12}
    summary = vs_trl.summarise({"ours": [ours], "trl": [trl]}, setup)
    assert summary["ours"]["model_tflops"] == pytest.approx(4.0)  # 8e12 FLOPs in 2 s
    assert summary["ours"]["mfu"] == pytest.approx(0.4)
    assert summary["trl"]["model_tflops"] == pytest.approx(3.0)
    assert summary["trl"]["mfu"] == pytest.approx(0.3)
    assert summary["ratios"]["mfu"] == pytest.approx(4 / 3)
    assert summary["ours"]["peak_device_gib"] == pytest.approx(3.0)
    assert summary["ratios"]["peak_device"] == pytest.approx(0.5)

    text = vs_trl.table(summary, steps=3, repeats=1, batch_size=4)
    assert "MFU (of 10 TFLOP/s)" in text and "40.0%" in text and "30.0%" in text
    assert "peak CUDA allocated (GiB)" in text and "peak RSS" not in text


def test_without_a_known_peak_there_is_no_mfu(vs_trl):
    ours = _result(vs_trl, "ours", [1.0, 1.0], [4e12, 4e12], 2**30)
    trl = _result(vs_trl, "trl", [1.0, 1.0], [4e12, 4e12], 2**30)
    summary = vs_trl.summarise({"ours": [ours], "trl": [trl]},
                               {"device": "cuda", "dtype": "float32", "peak_flops": None})
    assert summary["ours"]["model_tflops"] == pytest.approx(4.0)
    assert summary["ours"]["mfu"] is None and summary["ratios"]["mfu"] is None
    assert "MFU (peak unknown)" in vs_trl.table(summary, steps=2, repeats=1, batch_size=4)


def test_cpu_table_has_no_device_rows(vs_trl):
    ours = _result(vs_trl, "ours", [1.0, 1.0], [4e12, 4e12])
    trl = _result(vs_trl, "trl", [1.0, 1.0], [])
    summary = vs_trl.summarise({"ours": [ours], "trl": [trl]})
    assert summary["trl"]["model_tflops"] is None
    text = vs_trl.table(summary, steps=2, repeats=1, batch_size=4)
    assert "peak RSS (GiB)" in text
    assert "MFU" not in text and "TFLOP/s" not in text and "CUDA" not in text


def test_one_gpu_for_both_children(vs_trl):
    assert vs_trl.one_gpu({}) == "0"
    assert vs_trl.one_gpu({"CUDA_VISIBLE_DEVICES": "3, 1"}) == "3"
    with pytest.raises(SystemExit, match="hides every GPU"):
        vs_trl.one_gpu({"CUDA_VISIBLE_DEVICES": ""})
