"""TPUs and other PJRT devices through torch_xla.

torch_xla is imported inside methods only: importing this module (to list backends, say) must
work, and stay fast, where torch_xla is missing or built for another torch. The probe stops at
the device *type* PJRT will use; it does not start the runtime, because a started runtime holds
the TPU chips that the worker processes launched afterwards need.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from types import ModuleType
from typing import Any, ContextManager

import torch

from dpo.core.backend import Backend, MemoryStats
from dpo.core.errors import UsageError
from dpo.core.hookspecs import hookimpl

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


def _device_type() -> str | None:
    """What PJRT will run on: TPU, CUDA, NEURON or CPU (torch_xla picks one at import unless
    PJRT_DEVICE says); ``None`` when nothing is selected."""
    import torch_xla.runtime as xr

    return xr.device_type()


class XLABackend(Backend):
    """torch_xla's lazy tensors: ops are traced and compiled into one graph per step."""

    name = "xla"
    collective = "xla"

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

    def device(self, local_rank: int = 0) -> torch.device:
        # PJRT gives each process its own device, so the local rank does not pick it here.
        reason = self.unavailable_reason()
        if reason is not None:
            raise UsageError(f"backend 'xla' is not available: {reason}")
        return _torch_xla().device()

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

    def synchronize(self) -> None:
        # Waits for graphs already dispatched; cutting the pending graph is step_end's job, so
        # timing calls do not add graph boundaries (and recompiles).
        _xla_model().wait_device_ops()

    def step_end(self) -> None:
        # The graph cut: compile (once per shape) and run everything traced for this step.
        _torch_xla().sync()

    def memory_stats(self) -> MemoryStats:
        try:
            info = _xla_model().get_memory_info()
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

    def describe(self) -> str:
        reason = self.unavailable_reason()
        if reason is not None:
            return f"xla (unavailable: {reason})"
        return f"xla ({_device_type()})"


@hookimpl
def dpo_register_backends(register):
    register(XLABackend)
