"""The Intel path: ``ipex.optimize`` applied by the cpu (and xpu) backend's ``prepare`` where
Intel Extension for PyTorch is installed, bf16 weight prepacking only where the CPU can do it,
and a one-line note of what happened in the backend's description (so in the log and run.json).

The first tests plant a stand-in ``intel_extension_for_pytorch`` and run everywhere; the ones at
the end need the real one (the CI lane ``intel``: torch 2.8.0 and IPEX 2.8.0) and skip with the
reason elsewhere.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpo.backends import _intel
from dpo.backends.cpu import CPUBackend
from dpo.backends.xpu import XPUBackend
from dpo.cli import make_app
from dpo.core.interfaces.plugins import get_plugin_manager

TORCH_MINOR = ".".join(torch.__version__.split(".")[:2])
AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512 = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"})


@pytest.fixture
def fake_ipex(monkeypatch):
    """A stand-in IPEX of torch's own version that records its ``optimize`` calls."""
    module = types.ModuleType("intel_extension_for_pytorch")
    module.__version__ = f"{TORCH_MINOR}.0"
    module.calls = []

    def optimize(model, dtype=None, optimizer=None, inplace=False, **kwargs):
        module.calls.append({"dtype": dtype, "optimizer": optimizer, "inplace": inplace,
                             "training": model.training, **kwargs})
        return model if optimizer is None else (model, optimizer)

    module.optimize = optimize
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", module)
    monkeypatch.setattr(_intel, "installed_version", lambda: module.__version__)
    monkeypatch.delenv(_intel.SWITCH, raising=False)
    return module


def model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).eval()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_cpu_prepare_applies_ipex_for_training_and_says_so(fake_ipex, monkeypatch):
    """A model loaded in eval mode is switched to training (IPEX asserts the mode matches the
    optimizer), optimised in place, and the description records it."""
    monkeypatch.setattr(_intel, "cpu_flags", lambda: AVX2_ONLY)
    backend = CPUBackend()
    model, optimizer = model_and_optimizer()
    assert backend.prepare(model, optimizer, torch.float32) == (model, optimizer)
    assert fake_ipex.calls == [{"dtype": torch.float32, "optimizer": optimizer, "inplace": True,
                                "training": True}]  # fp32 prepacking needs no AVX-512
    assert backend.describe().endswith(
        f"intel-extension-for-pytorch {TORCH_MINOR}.0 applied (training, float32, "
        "0 layers prepacked))")


@pytest.mark.parametrize(("flags", "prepack"), [
    (AVX2_ONLY, False), (AVX512, True), (AVX2_ONLY | {"avx_ne_convert"}, True),
    (frozenset({"avx512f", "avx512bw", "avx512vl"}), False),  # DQ missing
])
def test_bf16_weight_prepacking_only_where_the_cpu_can(fake_ipex, monkeypatch, flags, prepack):
    monkeypatch.setattr(_intel, "cpu_flags", lambda: flags)
    backend = CPUBackend()
    backend.prepare(*model_and_optimizer(), torch.bfloat16)
    (call,) = fake_ipex.calls
    assert call["dtype"] == torch.bfloat16
    if prepack:
        assert "weights_prepack" not in call  # IPEX's default: prepack
        assert "0 layers prepacked" in backend.describe()
    else:
        assert call["weights_prepack"] is False
        assert ("weights not prepacked: bf16 prepacking needs AVX-512 BW/VL/DQ or "
                "AVX-NE-CONVERT, which this CPU lacks") in backend.describe()


def test_cpu_flags_come_from_proc_cpuinfo_or_torchs_dispatch_level(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512bw\n"
                       "processor\t: 1\nflags\t\t: other\n")
    assert _intel.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512bw"}
    assert _intel.cpu_flags(str(tmp_path / "missing")) is None
    monkeypatch.setattr(_intel, "cpu_flags", lambda: None)
    for level, supported in (("AVX2", False), ("AVX512", True), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda level=level: level)
        assert _intel.bf16_prepack_supported() is supported


def test_ipex_switched_off_mismatched_or_broken_is_not_applied_and_says_why(fake_ipex,
                                                                            monkeypatch):
    def prepared_note():
        backend = CPUBackend()
        model, optimizer = model_and_optimizer()
        assert backend.prepare(model, optimizer) == (model, optimizer)
        return backend.describe()

    monkeypatch.setenv(_intel.SWITCH, "0")
    assert prepared_note().endswith(
        f"intel-extension-for-pytorch {TORCH_MINOR}.0 installed, not applied (DPO_IPEX=0))")
    monkeypatch.delenv(_intel.SWITCH)

    # Checked from the metadata, before importing: a mismatched IPEX exits inside its import.
    monkeypatch.setattr(_intel, "installed_version", lambda: "1.13.100")
    assert prepared_note().endswith(
        f"intel-extension-for-pytorch 1.13.100 needs torch 1.13.*, not {torch.__version__}: "
        "not applied)")

    monkeypatch.setattr(_intel, "installed_version", lambda: f"{TORCH_MINOR}.0")
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)  # import raises
    assert "does not load here (ModuleNotFoundError: " in prepared_note()
    assert fake_ipex.calls == []

    monkeypatch.setattr(_intel, "installed_version", lambda: None)
    assert prepared_note() == CPUBackend().describe() and "intel" not in prepared_note()


def test_describe_before_prepare_says_what_prepare_will_do(fake_ipex, monkeypatch):
    """``dpo backends`` shows the extension that a run would apply, without importing it."""
    monkeypatch.delitem(sys.modules, "intel_extension_for_pytorch")
    assert CPUBackend().describe().endswith(f"intel-extension-for-pytorch {TORCH_MINOR}.0)")
    assert "intel_extension_for_pytorch" not in sys.modules


def test_xpu_prepare_applies_ipex_to_xpu_models_only(fake_ipex):
    """An XPU model goes through ipex.optimize (without the CPU's prepacking rule); a model
    elsewhere is left alone, so a CPU-only IPEX build never takes it for a CPU model."""
    backend = XPUBackend()
    model, optimizer = model_and_optimizer()
    assert backend.prepare(model, optimizer, torch.bfloat16) == (model, optimizer)
    assert fake_ipex.calls == []

    class OnXPU(torch.nn.Module):
        def parameters(self, recurse=True):
            yield types.SimpleNamespace(device=torch.device("xpu", 0))

    xpu_model = OnXPU()
    backend.prepare(xpu_model, optimizer, torch.bfloat16)
    assert [(c["dtype"], "weights_prepack" in c) for c in fake_ipex.calls] == [
        (torch.bfloat16, False)]


def test_xpu_peak_flops_table(monkeypatch):
    monkeypatch.setattr(XPUBackend, "unavailable_reason", classmethod(lambda cls: None))
    monkeypatch.setattr(torch.xpu, "current_device", lambda: 0)
    for name, bf16, fp32 in (("Intel(R) Data Center GPU Max 1550", 838.8608e12, 52.4288e12),
                             ("Intel(R) Data Center GPU Max 1100", 355.5328e12, 22.2208e12),
                             ("Intel(R) Arc(TM) A770 Graphics", None, None)):
        monkeypatch.setattr(torch.xpu, "get_device_name", lambda index=None, name=name: name)
        assert XPUBackend().peak_flops(torch.bfloat16) == pytest.approx(bf16)
        assert XPUBackend().peak_flops(torch.float32) == pytest.approx(fp32)


# -- with the real Intel Extension for PyTorch ------------------------------------------------

def _real_ipex_reason() -> str | None:
    if _intel.installed_version() is None:
        return "intel-extension-for-pytorch is not installed (the CI lane `intel` has it)"
    module, reason = _intel.load()
    return reason if module is None else None


REAL_IPEX_REASON = _real_ipex_reason()
needs_ipex = pytest.mark.skipif(REAL_IPEX_REASON is not None, reason=str(REAL_IPEX_REASON))


def logps_loss(model, ids):
    logits = model(input_ids=ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).mean().neg()


def train_steps(model, optimizer, dtype, steps=3):
    ids = torch.arange(2 * 24).remainder(250).view(2, 24)
    losses = []
    for _ in range(steps):
        with CPUBackend().autocast(dtype):
            loss = logps_loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@needs_ipex
def test_real_ipex_float32_training_matches_plain_torch(tiny_model):
    plain = copy.deepcopy(tiny_model).train()
    expected = train_steps(plain, torch.optim.AdamW(plain.parameters(), lr=1e-2), torch.float32)
    backend = CPUBackend()
    model, optimizer = backend.prepare(
        tiny_model, torch.optim.AdamW(tiny_model.parameters(), lr=1e-2), torch.float32)
    assert "applied (training, float32" in backend.describe()
    assert train_steps(model, optimizer, torch.float32) == pytest.approx(expected, abs=1e-5)


@needs_ipex
@pytest.mark.parametrize("flags", [AVX2_ONLY, None], ids=["avx2-only", "this-cpu"])
def test_real_ipex_bfloat16_training_with_or_without_prepacking(tiny_model, tiny_tokenizer,
                                                                monkeypatch, tmp_path, flags):
    """On an AVX2-only CPU (simulated) prepacking is turned off and bf16 training runs; on this
    CPU whatever it supports is used. Either way the losses stay close to float32's, and the
    trained model saves as a Hugging Face directory of float32 weights (the master copies)."""
    if flags is not None:
        monkeypatch.setattr(_intel, "cpu_flags", lambda: flags)
    plain = copy.deepcopy(tiny_model).train()
    reference = train_steps(plain, torch.optim.AdamW(plain.parameters(), lr=1e-2), torch.float32)
    backend = CPUBackend()
    model, optimizer = backend.prepare(
        tiny_model, torch.optim.AdamW(tiny_model.parameters(), lr=1e-2), torch.bfloat16)
    assert ("weights not prepacked" in backend.describe()) == (
        not _intel.bf16_prepack_supported())
    assert train_steps(model, optimizer, torch.bfloat16) == pytest.approx(reference, rel=2e-2)

    from transformers import AutoModelForCausalLM

    from dpo.core.training.checkpoint import save_model_dir

    save_model_dir(tmp_path / "saved", model, tiny_tokenizer)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")  # dtype from config.json
    masters = model.state_dict()  # IPEX's state_dict gives the float32 master weights
    assert torch.bfloat16 in {p.dtype for p in model.parameters()}  # computed on bf16 copies
    for name, value in saved.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, masters[name]), name


def write_pairs(path: Path) -> Path:
    rows = [{"prompt": f"What is {i % 7 + 1} plus {i % 5 + 2}? ",
             "chosen": f"{i % 7 + i % 5 + 3}.", "rejected": f"{i % 7 + i % 5 + 4}."}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@needs_ipex
def test_real_ipex_run_resumes_exactly_and_matches_a_run_without_it(tmp_path, monkeypatch):
    """A tiny `dpo run --backend cpu` with IPEX applied: run.json says so; losses equal those of
    the same run with DPO_IPEX=0; a run stopped at a checkpoint and resumed (IPEX's optimizer
    state saved and loaded) ends with the same weights as the uninterrupted one."""
    app = make_app(get_plugin_manager(load_entrypoints=False))
    data = write_pairs(tmp_path / "pairs.jsonl")
    common = ["run", "--no-progress", "--model", "tiny", "--data", str(data), "--backend", "cpu",
              "--batch-size", "4", "--lr", "1e-3", "--scheduler", "constant", "--save-steps", "2"]

    def run(out: str, *extra: str) -> list[dict]:
        result = CliRunner().invoke(app, [*common, "--output", str(tmp_path / out), *extra])
        assert result.exit_code == 0, result.output
        lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if '"loss"' in line]

    with_ipex = run("ipex", "--max-steps", "4")
    device = json.loads((tmp_path / "ipex" / "run.json").read_text())["resolved"]["device"]
    assert "intel-extension-for-pytorch" in device and "applied (training, float32" in device

    run("resumed", "--max-steps", "2")
    resumed = run("resumed", "--resume", str(tmp_path / "resumed"), "--max-steps", "4")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in with_ipex])

    monkeypatch.setenv(_intel.SWITCH, "0")
    without = run("plain", "--max-steps", "4")
    assert [r["loss"] for r in without] == pytest.approx([r["loss"] for r in with_ipex], abs=1e-5)

    from safetensors.torch import load_file

    a = load_file(tmp_path / "ipex" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LAYER_NORM_GRADIENTS = """
import sys, torch
torch.manual_seed(0)
norm, linear = torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)
x = torch.randn(4, 16, requires_grad=True)

def gradients(dtype):
    for t in (x, norm.weight, norm.bias, linear.weight):
        t.grad = None
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        linear(norm(x)).float().pow(2).sum().backward()
    return [t.grad.clone() for t in (x, norm.weight, norm.bias, linear.weight)]

before = {d: gradients(d) for d in (torch.float32, torch.bfloat16)}
import intel_extension_for_pytorch  # replaces layer_norm's kernel
after = {d: gradients(d) for d in (torch.float32, torch.bfloat16)}
print(max((a - b).abs().max().item() for d in before for a, b in zip(before[d], after[d])))
"""


@needs_ipex
def test_real_ipex_layer_norm_gradients_are_torchs_so_its_warning_is_silenced():
    """Why ``_intel.optimize`` silences torch's warning about IPEX's layer_norm kernel: with
    IPEX imported, a LayerNorm's gradients (input, weight, bias, and the next layer's) are
    bit for bit those computed before the import, in float32 and under bf16 autocast."""
    import subprocess

    done = subprocess.run([sys.executable, "-W", "ignore", "-c", LAYER_NORM_GRADIENTS],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) == 0.0
