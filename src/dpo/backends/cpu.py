"""The CPU backend: always available, the reference every other backend is compared with.

Where Intel Extension for PyTorch is installed (and matches torch), ``prepare`` applies
``ipex.optimize`` to the policy and its optimizer; see ``dpo.backends._intel``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
import time
from typing import Any, ContextManager

import torch

from dpo.backends import _intel
from dpo.core.backend import Backend, MemoryStats
from dpo.core.hookspecs import hookimpl


# glibc's mallopt parameter (malloc.h) and the threshold ``CPUBackend.save_memory`` sets.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
# ``CPUBackend.release_memory`` trims the heap at most once per this many seconds: a trim walks
# the heap (about 10 ms on SmolLM2-135M's), so its cost stays near 2% of the time it runs in.
TRIM_INTERVAL_S = 0.5
_UNSET: Any = object()  # malloc_trim not looked up yet


def _glibc(function: str) -> Any:
    """glibc's ``function`` (``mallopt``, ``malloc_trim``), or None where the C library is
    not glibc."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function)
    except (OSError, AttributeError):
        return None


class CPUBackend(Backend):
    """Plain torch on the host CPU; one process, one device."""

    name = "cpu"
    collective = "gloo"
    _trim: Any = _UNSET  # glibc's malloc_trim (None without it), looked up at first use
    _last_trim = 0.0

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

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)

    def default_dtype(self) -> torch.dtype:
        # bf16 autocast on CPU is only fast with AVX-512 BF16 or AMX, elsewhere (e.g. AVX2-only
        # machines) slower than fp32; and everywhere less accurate, which DPO feels: its signal
        # is a small difference of large summed log-probs. So ``auto`` stays fp32; bf16 is
        # there for those who ask (--dtype bfloat16).
        return torch.float32

    def autocast(self, dtype: torch.dtype) -> ContextManager[Any]:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        if dtype == torch.bfloat16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        raise ValueError(f"the cpu backend cannot train in {dtype}; use float32 or bfloat16")

    def memory_stats(self) -> MemoryStats:
        # Current first, then peak: the peak read afterwards can only be larger.
        current = _current_rss_bytes()
        peak = _peak_rss_bytes()
        if current is not None and peak is not None:
            peak = max(peak, current)
        return MemoryStats(current, peak)

    # reset_peak_memory stays a no-op: a process's peak RSS (ru_maxrss) cannot be reset.

    share_prompt_default = True  # 1.4x real tokens/s on HH-RLHF (benchmarks/techniques.py)

    def optimizer_options(self) -> dict[str, Any]:
        """torch's fused CPU AdamW: one pass over each parameter instead of several (7x faster
        on 135M parameters, ``benchmarks/techniques.py``). Left to Intel's extension where it
        will be applied, since it rewrites the optimizer itself."""
        if _intel.installed_version() is not None and _intel.problem() is None:
            return {}
        return {"fused": True}

    def save_memory(self) -> str | None:
        """Hand freed blocks of 1 MiB and more back to the system at once.

        glibc's malloc serves blocks from 128 KiB up with their own mapping, but raises that
        threshold (up to 32 MiB) each time such a block is freed, after which activations and
        gradients come from the heap, where a long-lived block between freed ones keeps them
        all resident: the peak resident memory of a step then exceeds what it holds by a
        third. A fixed threshold stops that (``mallopt(M_MMAP_THRESHOLD)``, which also turns
        the raising off). Measured on SmolLM2-135M with checkpointing (``benchmarks/vs_trl.py``):
        peak 3.26 -> 2.97 GiB with the same step time; at 128 KiB 2.72 GiB but steps 40%
        slower (a fresh mapping's pages are faulted in at each use). Left alone where the user
        set ``MALLOC_MMAP_THRESHOLD_`` or the C library is not glibc."""
        if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
            return None
        mallopt = _glibc("mallopt")
        if mallopt is None:
            return None
        done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        return "freed blocks of 1 MiB and more go back to the system" if done == 1 else None

    def release_memory(self) -> None:
        """Give the free parts of the heap back to the system (``malloc_trim``), at most once
        per ``TRIM_INTERVAL_S``.

        Blocks under the mmap threshold (a layer's activations for a few hundred tokens, the
        small weights' gradients) come from the heap, and glibc returns only its top: a block
        freed below a live one stays resident, and over a backward these holes add up to a
        quarter of a GiB on SmolLM2-135M. ``malloc_trim`` releases the pages of every free
        block. Measured with checkpointing on ``benchmarks/vs_trl.py``'s batches: peak 2.83 ->
        2.60 GiB, steps about 3% slower."""
        if self._trim is _UNSET:
            self._trim = _glibc("malloc_trim")
        if self._trim is None or time.monotonic() - self._last_trim < TRIM_INTERVAL_S:
            return
        self._trim(0)
        self._last_trim = time.monotonic()

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


def _current_rss_bytes() -> int | None:
    """Resident set size now, from /proc (Linux); ``None`` where there is no /proc."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int | None:
    try:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    # Linux reports KiB, macOS bytes.
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def _usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@hookimpl
def dpo_register_backends(register):
    register(CPUBackend)
