"""TPUs and other PJRT devices through torch_xla.

torch_xla is imported inside methods only: importing this module (to list backends, say) must
work, and stay fast, where torch_xla is missing or built for another torch. The probe stops at
the device *type* PJRT will use; it does not start the runtime, because a started runtime holds
the TPU chips that the worker processes launched afterwards need.

Operations on XLA tensors are traced, not run; a graph cut (``torch_xla.sync()``) compiles the
traced graph (once per distinct graph, so once per shape) and runs it. What keeps a run to a
bounded number of compiles and one host read per step:

* batch widths padded to a few buckets (``padded_length``; ``bucket_length``);
* no shapes that depend on values (``static_shapes``): completion log-probs by mask, not by
  boolean indexing, which would read the mask on the host and give each batch its own shape;
* eager attention (``configure_model``): sdpa's mask preparation reads tensors on the host;
* cuts after each micro-batch and evaluation batch, before the metrics are read, and after the
  optimizer step, so graphs repeat instead of growing with gradient accumulation.

``step_metrics`` reports torch_xla's own counters (compiles, host transfers, CPU fallbacks)
with every step, so a recompiling run shows in ``metrics.jsonl`` and ``run.json``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any, ContextManager

import torch

from dpo.core.interfaces.backend import Backend, MemoryStats
from dpo.core.data.batching import bucket_length
from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.hookspecs import hookimpl

NOT_INSTALLED = "torch_xla is not installed (pip install torch-xla matching your torch version)"


def _installed() -> bool:
    # A torch_xla already imported (or planted by a test) may carry no __spec__, which makes
    # find_spec raise; being in sys.modules is proof enough.
    return "torch_xla" in sys.modules or importlib.util.find_spec("torch_xla") is not None


def _torch_xla() -> ModuleType:
    import torch_xla

    return torch_xla


def _xla_model() -> ModuleType:
    import torch_xla.core.xla_model as xm

    return xm


def _metrics() -> ModuleType:
    import torch_xla.debug.metrics as met

    return met


def _device_type() -> str | None:
    """What PJRT will run on: TPU, CUDA, NEURON or CPU (torch_xla picks one at import unless
    PJRT_DEVICE says); ``None`` when nothing is selected."""
    import torch_xla.runtime as xr

    return xr.device_type()


# Dense bf16 peak FLOP/s of one PJRT device (one chip from v4 on), from Google Cloud's TPU
# pages, keyed by the accelerator type's prefix (``v5litepod-8`` -> ``v5litepod``).
_TPU_PEAKS = {
    "v4": 275e12,
    "v5litepod": 197e12,  # v5e
    "v5e": 197e12,
    "v5p": 459e12,
    "v6e": 918e12,
}


@functools.cache
def _tpu_type() -> str | None:
    """``v4``, ``v5litepod``, ``v5p``, ``v6e``, ... from the TPU VM's accelerator type (asked of
    the metadata server once, when not in the environment)."""
    accelerator = os.environ.get("TPU_ACCELERATOR_TYPE")
    if not accelerator:
        try:
            from torch_xla._internal import tpu

            return tpu.get_tpu_type()
        except Exception:  # not a TPU VM, no metadata server, or the private API moved
            return None
    return accelerator.split("-")[0]


def _counters() -> dict[str, float]:
    met = _metrics()
    compiles = met.metric_data("CompileTime")  # (samples, accumulator, ...), None before any
    transfers = met.metric_data("TransferFromDeviceTime")
    # An ``aten::`` counter counts calls of an op that XLA lacks and ran on the host instead.
    fallbacks = sum(met.counter_value(name) or 0 for name in met.counter_names()
                    if name.startswith("aten::"))
    return {"compiles": float(compiles[0] if compiles else 0),
            "host_transfers": float(transfers[0] if transfers else 0),
            "cpu_fallbacks": float(fallbacks)}


class XLABackend(Backend):
    """torch_xla's lazy tensors: ops are traced, then compiled and run at each graph cut."""

    name = "xla"
    device_type = "xla"
    collective = "xla"
    static_shapes = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not _installed():
            return NOT_INSTALLED
        try:
            device_type = _device_type()
        except Exception as exc:  # e.g. an undefined symbol when built for another torch
            first = " ".join(str(exc).split()[:30]) or type(exc).__name__
            return (f"torch_xla is installed but does not load with torch {torch.__version__} "
                    f"({type(exc).__name__}: {first}); install the matching torch-xla")
        if not device_type:
            return "torch_xla has no device selected; set PJRT_DEVICE (e.g. TPU or CPU)"
        return None

    @classmethod
    def device_count(cls) -> int:
        """Devices this process addresses. This starts the XLA runtime: ask in workers only."""
        if not cls.is_available():
            return 0
        import torch_xla.runtime as xr

        return int(xr.addressable_device_count())

    def __init__(self) -> None:
        self._counted_from: dict[str, float] = {}  # step_metrics count from device()

    def device(self, local_rank: int = 0) -> torch.device:
        # PJRT gives each process its own device, so the local rank does not pick it here.
        reason = self.unavailable_reason()
        if reason is not None:
            raise UsageError(f"backend 'xla' is not available: {reason}")
        device = _torch_xla().device()
        self._counted_from = _counters()
        return device

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)

    def default_dtype(self) -> torch.dtype:
        # TPUs compute in bf16 natively; PJRT on CPU (the CI lane) is exact and faster in fp32.
        return torch.bfloat16 if self.is_available() and _device_type() == "TPU" else torch.float32

    def autocast(self, dtype: torch.dtype) -> ContextManager[Any]:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        if dtype == torch.bfloat16:
            return torch.autocast("xla", dtype=torch.bfloat16)
        raise ValueError(f"the xla backend cannot train in {dtype}; use float32 or bfloat16")

    def padded_length(self, longest: int) -> int:
        # 64, 128, ..., 512, then 4 widths per doubling: each is one more graph to compile.
        return bucket_length(longest)

    def configure_model(self, model: torch.nn.Module) -> None:
        # Moving to an XLA device gives each parameter a new Parameter object (XLA tensors
        # cannot take over a CPU tensor's storage), so tied weights (the embedding and the
        # output head) come apart and would train as two matrices: tie them again.
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        # sdpa's mask preparation asks whether the attention mask is all ones (a host read, and
        # a graph cut) in every layer call; eager attention builds the mask on the device.
        config = getattr(model, "config", None)
        if (hasattr(model, "set_attn_implementation")
                and getattr(config, "_attn_implementation", None) == "sdpa"):
            model.set_attn_implementation("eager")

    def materialize(self) -> None:
        _torch_xla().sync()

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        # With PJRT's own processes (torch_xla.launch) and no torch.distributed wrapper, each
        # replica holds its own gradients: average them before clipping, as xm.optimizer_step
        # would before stepping. DDP/FSDP over the "xla" process group reduce in backward.
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            _xla_model().reduce_gradients(optimizer)  # a no-op for one replica

    def synchronize(self) -> None:
        # Waits for graphs already dispatched; cutting the pending graph is step_end's job, so
        # timing calls do not add graph boundaries (and recompiles).
        _xla_model().wait_device_ops()

    def step_end(self) -> None:
        # The graph cut after the optimizer step: the update runs as its own graph, compiled
        # twice per run (the first step creates the optimizer state) and cached after that.
        _torch_xla().sync()

    def step_metrics(self) -> dict[str, float]:
        """torch_xla's counts since ``device()``: graphs compiled, copies from the device to
        the host, and operations that fell back to the CPU. Compiles stop growing once every
        batch shape has been seen; host transfers grow by one per step."""
        now = _counters()
        return {f"xla/{k}": v - self._counted_from.get(k, 0.0) for k, v in now.items()}

    def memory_stats(self) -> MemoryStats:
        try:
            info = _xla_model().get_memory_info(_torch_xla().device())
        except Exception:  # PJRT on CPU does not implement it
            return MemoryStats(None, None)
        current, peak = info.get("bytes_used"), info.get("peak_bytes_used")
        return MemoryStats(None if current is None else int(current),
                           None if peak is None else int(peak))

    def rng_state(self) -> Any:
        """The device's RNG seed (torch_xla keeps an integer, not a generator state)."""
        return _xla_model().get_rng_state() if self.is_available() else None

    def set_rng_state(self, state: Any) -> None:
        if state is not None:
            _xla_model().set_rng_state(state)

    def peak_flops(self, dtype: torch.dtype) -> float | None:
        if dtype != torch.bfloat16 or not self.is_available() or _device_type() != "TPU":
            return None  # TPUs multiply float32 in several bf16 passes: no single figure
        return _TPU_PEAKS.get(_tpu_type() or "")

    def describe(self) -> str:
        reason = self.unavailable_reason()
        if reason is not None:
            return f"xla (unavailable: {reason})"
        return f"xla ({_device_type()})"


@hookimpl
def dpo_register_backends(register):
    register(XLABackend)
