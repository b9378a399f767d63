"""Built-in backends, their availability probes and messages, and dpo.testing's marker and
fixtures. Hardware that this machine lacks is simulated by patching torch's own probes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import dpo
from dpo.backends.cpu import CPUBackend
from dpo.backends.cuda import CUDABackend
from dpo.backends.rocm import ROCmBackend
from dpo.backends.xla import NOT_INSTALLED, XLABackend
from dpo.backends.xpu import XPUBackend
from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.plugins import collect
from dpo.testing import plugin_of

pytest_plugins = ["pytester"]

BUILTIN = {"cpu": CPUBackend, "cuda": CUDABackend, "rocm": ROCmBackend, "xpu": XPUBackend,
           "xla": XLABackend}
MiB = 1 << 20


def test_builtin_plugins_register_all_five_backends(dpo_catalog):
    for name, cls in BUILTIN.items():
        assert dpo_catalog.backends.get(name) is cls
        assert dpo_catalog.backends.providers[name] == f"dpo.backends.{name}"
    assert {n: c.collective for n, c in BUILTIN.items()} == {
        "cpu": "gloo", "cuda": "nccl", "rocm": "nccl", "xpu": "xccl", "xla": "xla"}


def test_cpu_backend_devices_dtypes_and_autocast():
    backend = CPUBackend()
    assert CPUBackend.is_available() and CPUBackend.device_count() == 1
    assert backend.device(0) == backend.device(3) == torch.device("cpu")
    assert backend.supported_dtypes() == (torch.float32, torch.bfloat16)
    assert backend.default_dtype() == torch.float32
    a = torch.randn(8, 8)
    with backend.autocast(torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with backend.autocast(torch.float32):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError, match="float16"):
        backend.autocast(torch.float16)
    assert backend.rng_state() is None
    assert backend.describe().startswith("cpu (") and "core" in backend.describe()


def test_cpu_release_memory_trims_the_heap_at_most_once_per_interval(monkeypatch):
    """``release_memory`` calls glibc's malloc_trim(0), then skips calls until
    ``TRIM_INTERVAL_S`` has passed (a clock moved by hand: 0 s trims, 0.4 s skips, 0.6 s
    trims again); where the C library has no malloc_trim it does nothing."""
    from dpo.core.interfaces import backend as cpu  # the host defaults live in the base class

    trims, clock = [], [100.0]
    monkeypatch.setattr(cpu, "_glibc", lambda name: trims.append if name == "malloc_trim" else None)
    monkeypatch.setattr(cpu.time, "monotonic", lambda: clock[0])
    backend = CPUBackend()
    backend.release_memory()
    assert trims == [0]
    clock[0] += 0.4 * cpu.TRIM_INTERVAL_S / 0.5
    backend.release_memory()
    assert trims == [0]
    clock[0] += 0.2 * cpu.TRIM_INTERVAL_S / 0.5
    backend.release_memory()
    assert trims == [0, 0]
    monkeypatch.setattr(cpu, "_glibc", lambda name: None)
    bare = CPUBackend()
    bare.release_memory()
    bare.release_memory()
    assert trims == [0, 0]


def test_cpu_memory_stats_are_resident_bytes_with_peak_at_least_current():
    held = torch.ones(16 * MiB // 4)  # 16 MiB, written, so resident
    stats = CPUBackend().memory_stats()
    assert stats.current_bytes is not None and stats.current_bytes >= held.nbytes
    assert stats.peak_bytes is not None and stats.peak_bytes >= stats.current_bytes
    CPUBackend().reset_peak_memory()  # cannot reset a process's peak RSS; must not fail


def test_cpu_memory_stats_without_proc(monkeypatch):
    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/statm")

    monkeypatch.setattr("dpo.core.interfaces.backend.open", no_proc, raising=False)
    stats = CPUBackend().memory_stats()
    assert stats.current_bytes is None and stats.peak_bytes > 0


def test_tiny_model_fixture_under_cpu_autocast(tiny_model, tiny_tokenizer):
    backend = CPUBackend()
    ids = tiny_tokenizer("hello world", return_tensors="pt").input_ids.to(backend.device())
    with torch.no_grad(), backend.autocast(torch.bfloat16):
        logits = tiny_model(ids).logits
    assert logits.dtype == torch.bfloat16 and logits.shape[:2] == ids.shape


def test_cuda_unavailable_here_with_its_reason():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; test_cuda_backend_on_a_gpu covers it")
    reason = CUDABackend.unavailable_reason()
    if torch.version.cuda is None and not torch.version.hip:
        assert reason == "this torch build has no CUDA"
    assert reason and not CUDABackend.is_available() and CUDABackend.device_count() == 0
    with pytest.raises(UsageError, match="not available"):
        CUDABackend().device(0)
    assert CUDABackend().memory_stats() == dpo.MemoryStats(None, None)
    assert CUDABackend().describe() == f"cuda (unavailable: {reason})"


def test_rocm_refuses_a_torch_build_without_hip():
    if torch.version.hip:
        pytest.skip("this is a ROCm build of torch")
    expected = ("this torch build is for CUDA, not ROCm; install a ROCm build of torch"
                if torch.version.cuda else "this torch build has no ROCm (HIP) support")
    assert ROCmBackend.unavailable_reason() == expected
    assert ROCmBackend.device_count() == 0


@pytest.fixture
def build(monkeypatch):
    """Pretend torch was built for ``cuda``/``hip`` (version strings, or None)."""

    def pretend(cuda: str | None = None, hip: str | None = None) -> None:
        monkeypatch.setattr(torch.version, "cuda", cuda)
        monkeypatch.setattr(torch.version, "hip", hip)

    return pretend


def test_build_mismatch_reasons(build, monkeypatch):
    build(hip="6.2.41133")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert CUDABackend.unavailable_reason() == "this is a ROCm build of torch; use --backend rocm"
    assert ROCmBackend.unavailable_reason() is None

    build(cuda="12.8")
    assert CUDABackend.unavailable_reason() is None
    assert ROCmBackend.unavailable_reason() == (
        "this torch build is for CUDA, not ROCm; install a ROCm build of torch")

    build()
    assert CUDABackend.unavailable_reason() == "this torch build has no CUDA"
    assert ROCmBackend.unavailable_reason() == "this torch build has no ROCm (HIP) support"


@pytest.fixture
def cuda_build_without_gpu(build, monkeypatch):
    build(cuda="12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_cuda_reason_names_the_visibility_variable(cuda_build_without_gpu, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert CUDABackend.unavailable_reason() == 'no CUDA device is visible (CUDA_VISIBLE_DEVICES="")'


def test_cuda_reason_passes_on_the_driver_error(cuda_build_without_gpu, monkeypatch):
    def no_driver() -> None:
        raise RuntimeError("Found no NVIDIA driver on your system. Please check that you have an "
                           "NVIDIA GPU and installed a driver\nfrom http://www.nvidia.com")

    monkeypatch.setattr(torch.cuda, "init", no_driver)
    assert CUDABackend.unavailable_reason() == (
        "no CUDA device is visible: Found no NVIDIA driver on your system. Please check that "
        "you have an NVIDIA GPU and installed a driver")


def test_cuda_reason_keeps_torchs_warning_instead_of_leaking_it(cuda_build_without_gpu,
                                                                monkeypatch):
    def old_driver() -> bool:
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old "
                      "(found version 11040).", UserWarning)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", old_driver)
    assert CUDABackend.unavailable_reason() == (
        "no CUDA device is visible: The NVIDIA driver on your system is too old "
        "(found version 11040).")


def test_cuda_reason_without_any_clue_gives_a_hint(cuda_build_without_gpu):
    assert CUDABackend.unavailable_reason() == (
        "no CUDA device is visible (is a GPU attached and its driver loaded? `nvidia-smi` "
        "should list it)")


def test_xpu_reasons(monkeypatch):
    if torch.xpu.is_available():
        pytest.skip("an Intel XPU is present")
    if not torch.xpu._is_compiled():
        assert XPUBackend.unavailable_reason() == "this torch build has no XPU support"
    monkeypatch.setattr(torch.xpu, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "init", lambda: None)
    monkeypatch.setenv("ZE_AFFINITY_MASK", "7")
    monkeypatch.delenv("ONEAPI_DEVICE_SELECTOR", raising=False)
    assert XPUBackend.unavailable_reason() == (
        'no Intel XPU device is visible (ZE_AFFINITY_MASK="7")')
    model = torch.nn.Linear(2, 2)
    assert XPUBackend().prepare(model, None) == (model, None)


@pytest.mark.parametrize(("device_name", "dtype", "expected"), [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),
    ("NVIDIA L4", torch.float16, 121e12),
    ("NVIDIA L40S", torch.bfloat16, 362e12),
    ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, None),
    ("NVIDIA A10G", torch.bfloat16, None),
    ("NVIDIA GeForce GTX 1080", torch.bfloat16, None),
])
def test_cuda_peak_flops_table(monkeypatch, device_name, dtype, expected):
    monkeypatch.setattr(CUDABackend, "unavailable_reason", classmethod(lambda cls: None))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: device_name)
    assert CUDABackend().peak_flops(dtype) == expected


def test_rocm_peak_flops_table(monkeypatch):
    monkeypatch.setattr(ROCmBackend, "unavailable_reason", classmethod(lambda cls: None))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "AMD Instinct MI300X")
    assert ROCmBackend().peak_flops(torch.bfloat16) == 1307.4e12


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.backend(n))
                                  for n in ("cuda", "rocm", "xpu")])
def test_gpu_backend_on_its_device(name):
    """Runs where such a GPU is present (the backend's probe says so); skipped elsewhere with
    the probe's reason, e.g. ``cuda: this torch build has no CUDA``."""
    backend = BUILTIN[name]()
    module = getattr(torch, "xpu" if name == "xpu" else "cuda")
    device = backend.device(0)
    assert device == torch.device("xpu" if name == "xpu" else "cuda", 0)
    assert module.current_device() == 0 and type(backend).device_count() >= 1
    assert torch.float16 in backend.supported_dtypes()
    assert backend.default_dtype() in backend.supported_dtypes()

    backend.reset_peak_memory()
    before = backend.memory_stats()
    a = torch.randn(512, 512, device=device)
    low = backend.default_dtype()
    with backend.autocast(low):
        product = a @ a
    backend.synchronize()
    assert product.dtype == low
    after = backend.memory_stats()
    assert after.current_bytes >= before.current_bytes + a.nbytes
    assert after.peak_bytes >= after.current_bytes

    state = backend.rng_state()
    first = torch.rand(16, device=device)
    backend.set_rng_state(state)
    assert torch.equal(first, torch.rand(16, device=device))

    assert module.get_device_name(0) in backend.describe()
    peak = backend.peak_flops(torch.bfloat16)
    assert peak is None or peak > 1e13
    model = torch.nn.Linear(8, 8).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    prepared, prepared_optimizer = backend.prepare(model, optimizer, low)
    prepared(torch.randn(2, 8, device=device)).sum().backward()
    prepared_optimizer.step()


def test_xla_reason_when_torch_xla_is_absent(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_xla", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert XLABackend.unavailable_reason() == NOT_INSTALLED
    assert XLABackend.device_count() == 0
    assert XLABackend().describe() == f"xla (unavailable: {NOT_INSTALLED})"


def test_xla_reason_when_torch_xla_does_not_load(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_xla", None)  # makes `import torch_xla` raise
    reason = XLABackend.unavailable_reason()
    assert reason.startswith(f"torch_xla is installed but does not load with torch "
                             f"{torch.__version__} (ModuleNotFoundError: ")
    assert reason.endswith("; install the matching torch-xla")


FAKE_TORCH_XLA = {
    "__init__.py": """
        import torch
        SYNCS = []
        def device():
            return torch.device("xla", 0)
        def sync():
            SYNCS.append(1)
    """,
    "runtime.py": """
        def device_type():
            return "CPU"
    """,
    "core/__init__.py": "",
    "core/xla_model.py": """
        REDUCED = []
        def reduce_gradients(optimizer):
            REDUCED.append(optimizer)
    """,
    "debug/__init__.py": "",
    "debug/metrics.py": """
        COMPILES = [2]
        def metric_data(name):
            return (COMPILES[0], 1.0, ()) if name == "CompileTime" else None
        def counter_names():
            return ["aten::nonzero", "MarkStep"]
        def counter_value(name):
            return 3
    """,
}

LAZINESS_CHECK = """
    import sys
    import dpo.backends.xla as xla
    assert "torch_xla" not in sys.modules, "importing dpo.backends.xla imported torch_xla"
    assert xla.XLABackend.unavailable_reason() is None
    assert "torch_xla" in sys.modules
    backend = xla.XLABackend()
    assert backend.device() == __import__("torch").device("xla", 0)
    backend.materialize()
    backend.step_end()
    assert sys.modules["torch_xla"].SYNCS == [1, 1]
    backend.reduce_gradients("the optimizer")  # PJRT replicas, no torch.distributed here
    assert sys.modules["torch_xla.core.xla_model"].REDUCED == ["the optimizer"]
    sys.modules["torch_xla.debug.metrics"].COMPILES[0] = 5  # three compiles since device()
    assert backend.step_metrics() == {
        "xla/compiles": 3.0, "xla/host_transfers": 0.0, "xla/cpu_fallbacks": 0.0}
    print(backend.describe())
"""


def test_importing_xla_backend_does_not_import_torch_xla(tmp_path):
    """In a fresh interpreter with an importable stand-in torch_xla: the module import leaves it
    alone; the probe, device(), the graph cuts and the counters (counted from device()) use it."""
    package = tmp_path / "torch_xla"
    for filename, source in FAKE_TORCH_XLA.items():
        (package / filename).parent.mkdir(parents=True, exist_ok=True)
        (package / filename).write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LAZINESS_CHECK)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "xla (CPU)"


def test_backend_marker_skips_with_the_backends_own_reason(pytester, monkeypatch):
    monkeypatch.setattr(XLABackend, "unavailable_reason",
                        classmethod(lambda cls: "simulated: no TPU here"))
    pytester.makepyfile("""
        import pytest
        from dpo.testing import requires_backend

        @pytest.mark.backend("xla")
        def test_needs_xla():
            raise AssertionError("must not run")

        @requires_backend("xla")
        def test_needs_xla_too():
            raise AssertionError("must not run")

        @pytest.mark.backend("cpu")
        def test_runs_on_cpu():
            pass
    """)
    result = pytester.runpytest("-p", "dpo.testing", "--strict-markers", "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([
        "SKIPPED [[]1[]] test_backend_marker_skips*.py:4: xla: simulated: no TPU here",
        "SKIPPED [[]1[]] test_backend_marker_skips*.py:8: xla: simulated: no TPU here",
    ])


def test_backend_marker_uses_the_real_probe(pytester):
    reason = CUDABackend.unavailable_reason()
    pytester.makepyfile("""
        import pytest

        @pytest.mark.backend("cuda")
        def test_needs_cuda():
            pass
    """)
    result = pytester.runpytest("-p", "dpo.testing", "-rs")
    if reason is None:
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines([f"SKIPPED*cuda: {reason}"])


def test_backend_marker_with_unknown_name_or_bad_arguments_errors(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.backend("tpu9")
        def test_typo():
            pass

        @pytest.mark.backend()
        def test_no_name():
            pass
    """)
    result = pytester.runpytest("-p", "dpo.testing", "--strict-markers")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([
        "*@pytest.mark.backend('tpu9'): unknown backend 'tpu9'; installed: *cpu*",
        "*@pytest.mark.backend takes one backend name*",
    ])


def test_dpo_register_unregisters_after_the_test_even_when_it_fails(pytester):
    pytester.makepyfile("""
        import dpo
        from dpo.backends.cpu import CPUBackend
        from dpo.core.interfaces.plugins import collect

        class FakeBackend(CPUBackend):
            name = "fake"

        class Plugin:
            @dpo.hookimpl
            def dpo_register_backends(self, register):
                register(FakeBackend)

        managers = []

        def test_register(dpo_register, dpo_plugin_manager):
            assert dpo_register(Plugin(), name="fake-plugin") == "fake-plugin"
            assert collect(dpo_plugin_manager).backends.providers["fake"] == "fake-plugin"
            managers.append(dpo_plugin_manager)
            raise AssertionError("failing after registering")

        def test_gone_afterwards():
            pm = managers[0]
            assert not pm.has_plugin("fake-plugin") and "fake-plugin" not in pm.sources
            assert "fake" not in collect(pm).backends
            assert pm.has_plugin("dpo.backends.cpu")
    """)
    result = pytester.runpytest("-p", "dpo.testing")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*failing after registering*"])


def test_dpo_register_refuses_taken_names_and_cleans_up_refused_plugins(dpo_register,
                                                                         dpo_plugin_manager):
    class Typo:
        @dpo.hookimpl
        def dpo_register_backend(self, register):  # missing "s": no such hook
            pass

    with pytest.raises(ValueError, match="unknown hook 'dpo_register_backend'"):
        dpo_register(Typo(), name="typo")
    assert not dpo_plugin_manager.has_plugin("typo") and "typo" not in dpo_plugin_manager.sources

    with pytest.raises(ValueError, match="already registered"):
        dpo_register(Typo(), name="dpo.backends.cpu")
    assert "cpu" in collect(dpo_plugin_manager).backends


@pytest.mark.parametrize("name", ["rocm", "xla", "cuda", "xpu"])
def test_run_on_an_unavailable_backend_is_one_line_exit_2_and_writes_nothing(name, tmp_path):
    """E.g. --backend rocm on a CUDA or CPU build of torch, --backend xla without torch_xla."""
    reason = BUILTIN[name].unavailable_reason()
    if reason is None:
        pytest.skip(f"{name} is available here")
    from typer.testing import CliRunner

    from dpo.cli import make_app
    from dpo.core.interfaces.plugins import get_plugin_manager

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "1 + 1 = ", "chosen": "2", "rejected": "3"}\n')
    out = tmp_path / "out"
    app = make_app(get_plugin_manager(load_entrypoints=False))
    result = CliRunner().invoke(app, ["run", "--model", "tiny", "--data", str(data),
                                      "--backend", name, "--output", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"error: backend {name!r} is not available here: {reason}"]
    assert not out.exists()


def test_backends_rows_say_the_auto_dtype_and_the_device_or_why_not(dpo_catalog):
    from dpo.cli.backends import backend_rows

    rows = {r["name"]: r for r in backend_rows(dpo_catalog)}
    assert rows["cpu"]["dtype"] == "float32" and rows["cpu"]["device"] == CPUBackend().describe()
    for row in rows.values():
        if row["available"]:
            assert row["device"] and row["dtype"] and not row["reason"]
        else:
            assert row["reason"] and not row["device"] and not row["dtype"]


# -- what a third-party backend inherits ---------------------------------------------------------

class MinimalHost(dpo.Backend):
    """All a third party must write for a backend computing on the host."""

    name = "minimal-host"
    device_type = "cpu"

    @classmethod
    def unavailable_reason(cls):
        return None

    @classmethod
    def device_count(cls):
        return 1

    def device(self, local_rank=0):
        return torch.device("cpu")


class MinimalAccelerator(MinimalHost):
    name = "minimal-mps"
    device_type = "mps"


def test_a_minimal_host_backend_gets_the_cpu_backends_speed_defaults(monkeypatch):
    """Shared prompt, fused AdamW, bf16 autocast, resident memory, and the allocator's
    threshold (mallopt(M_MMAP_THRESHOLD = -3, 1 MiB)) and trim (malloc_trim(0)) under
    --gradient-checkpointing: what the built-in cpu backend does, with nothing overridden."""
    from dpo.backends import _intel
    from dpo.core.interfaces import backend as base

    calls = []
    monkeypatch.setattr(base, "_glibc", lambda name: lambda *args: calls.append((name, args)) or 1)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(_intel, "installed_version", lambda: None)  # cpu's fused AdamW is plain
    mine, cpu = MinimalHost(), CPUBackend()
    for backend in (mine, cpu):
        assert backend.share_prompt_default is True
        assert backend.optimizer_options() == {"fused": True}
        assert backend.supported_dtypes() == (torch.float32, torch.bfloat16)
        a = torch.randn(4, 4)
        with backend.autocast(torch.bfloat16):
            assert (a @ a).dtype == torch.bfloat16
        stats = backend.memory_stats()
        assert stats.current_bytes and stats.peak_bytes >= stats.current_bytes
        calls.clear()
        assert backend.save_memory() == "freed blocks of 1 MiB and more go back to the system"
        backend.release_memory()
        assert calls == [("mallopt", (-3, 1 << 20)), ("malloc_trim", (0,))]


def test_a_minimal_accelerator_backend_keeps_the_batched_path_and_the_host_alone(monkeypatch):
    from dpo.core.interfaces import backend as base

    calls = []
    monkeypatch.setattr(base, "_glibc", lambda name: lambda *args: calls.append(name) or 1)
    mine = MinimalAccelerator()
    assert mine.share_prompt_default is False
    assert mine.optimizer_options() == {"fused": True}  # torch has a fused AdamW for mps
    assert mine.supported_dtypes() == (torch.float32,)
    assert mine.memory_stats() == dpo.MemoryStats(None, None)
    assert mine.save_memory() is None
    mine.release_memory()
    assert calls == []
    assert type("Odd", (MinimalAccelerator,), {"device_type": "odd"})().optimizer_options() == {}


def test_a_backend_without_device_type_is_refused_with_what_to_set():
    from dpo.core.interfaces.plugins import get_plugin_manager, register_plugin

    vague = type("Vague", (dpo.Backend,), {
        "name": "vague", "unavailable_reason": MinimalHost.unavailable_reason,
        "device_count": MinimalHost.device_count, "device": MinimalHost.device})

    pm = get_plugin_manager(load_entrypoints=False)
    register_plugin(pm, plugin_of(vague), "vague-plugin")
    assert "vague" not in collect(pm).backends
    [failure] = pm.failures
    assert failure.name == "vague-plugin" and "set the class attribute device_type" in failure.error
