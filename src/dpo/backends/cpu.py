"""The CPU backend: always available, the reference every other backend is compared with.

Where Intel Extension for PyTorch is installed (and matches torch), ``prepare`` applies
``ipex.optimize`` to the policy and its optimizer; see ``dpo.backends._intel``.
"""

from __future__ import annotations

import os
from typing import Any, ContextManager

import torch

from dpo.backends import _intel
from dpo.core.interfaces.backend import Backend
from dpo.core.interfaces.hookspecs import hookimpl


class CPUBackend(Backend):
    """Plain torch on the host CPU; one process, one device.

    Its speed settings (shared prompt, fused AdamW, the allocator's threshold and trims, resident
    memory statistics, bf16 autocast) are ``dpo.Backend``'s defaults for ``device_type = "cpu"``;
    this class adds Intel Extension for PyTorch and a description of the cores."""

    name = "cpu"
    device_type = "cpu"
    collective = "gloo"

    def __init__(self) -> None:
        self._intel: _intel.IntelStatus | None = None  # set by prepare()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    @classmethod
    def device_count(cls) -> int:
        return 1

    def device(self, local_rank: int = 0) -> torch.device:
        # Every local rank shares the one host; torch.distributed tells the ranks apart.
        return torch.device("cpu")

    def default_dtype(self) -> torch.dtype:
        # bf16 autocast on CPU is only fast with AVX-512 BF16 or AMX, elsewhere (e.g. AVX2-only
        # machines) slower than fp32; and everywhere less accurate, which DPO feels: its signal
        # is a small difference of large summed log-probs. So ``auto`` stays fp32; bf16 is
        # there for those who ask (--dtype bfloat16).
        return torch.float32

    def autocast(self, dtype: torch.dtype) -> ContextManager[Any]:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the cpu backend cannot train in {dtype}; use float32 or bfloat16")
        return super().autocast(dtype)

    def optimizer_options(self) -> dict[str, Any]:
        """The base class's fused AdamW, left to Intel's extension where it will be applied,
        since it rewrites the optimizer itself."""
        if _intel.installed_version() is not None and _intel.problem() is None:
            return {}
        return super().optimizer_options()

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                dtype: torch.dtype = torch.float32):
        """Intel Extension for PyTorch's pass, where it is installed; otherwise nothing."""
        model, optimizer, self._intel = _intel.optimize(model, optimizer, dtype, "cpu")
        return model, optimizer

    def describe(self) -> str:
        cores = _usable_cores()
        parts = [f"{cores} core{'s' if cores != 1 else ''}",
                 torch.backends.cpu.get_cpu_capability()]
        status = getattr(self, "_intel", None)  # a subclass may skip __init__
        if status is not None:
            note = status.note
        else:  # not prepared yet (dpo backends): what prepare would do
            version = _intel.installed_version()
            note = _intel.problem() or (version and f"{_intel.DISTRIBUTION} {version}")
        if note:
            parts.append(note)
        return f"cpu ({', '.join(parts)})"


def _usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@hookimpl
def dpo_register_backends(register):
    register(CPUBackend)
