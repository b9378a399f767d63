"""The Backend interface: everything that differs between accelerators.

Vendor SDKs (torch_xla, intel_extension_for_pytorch, ...) are imported inside methods, never at
module import, so that listing backends works on any machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, ContextManager

import torch

HOST = "cpu"  # the device type whose tensors live in the process's own memory
# glibc's mallopt parameter (malloc.h) and the threshold ``Backend.save_memory`` sets on the host.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
# ``Backend.release_memory`` trims the heap at most once per this many seconds: a trim walks the
# heap (about 10 ms on SmolLM2-135M's), so its cost stays near 2% of the time it runs in.
TRIM_INTERVAL_S = 0.5
_UNSET: Any = object()  # malloc_trim not looked up yet
# Device types with a fused AdamW kernel, where torch cannot be asked (its list is private).
_FUSED_ADAMW_FALLBACK = ("cpu", "cuda", "mps", "xpu", "hpu")


@dataclass(frozen=True)
class MemoryStats:
    """Bytes of memory in use now and at the peak since the last reset (``None``: unknown)."""

    current_bytes: int | None
    peak_bytes: int | None


class Backend(ABC):
    """A hardware backend plugin.

    A subclass sets ``name`` (the ``--backend`` value), ``device_type`` (the torch device type
    that ``device()`` returns: ``"cpu"``, ``"cuda"``, ``"mps"``, ...) and ``collective`` (the
    torch.distributed backend: gloo, nccl, xccl, xla), and implements ``unavailable_reason``,
    ``device_count`` and ``device``. A backend without ``device_type`` is refused at
    registration, because the speed defaults below follow it:

    ======================================  ==================================  =================
    method or attribute                      ``device_type == "cpu"`` (host)      any other
    ======================================  ==================================  =================
    ``supported_dtypes``                     float32, bfloat16                   float32
    ``autocast(dtype)``                      ``torch.autocast(device_type)`` for a dtype other
                                             than float32 (a no-op for float32)
    ``share_prompt_default``                 True: a forward per pair, no pad    False: batched
    ``optimizer_options``                    ``{"fused": True}`` where torch has a fused AdamW
                                             for ``device_type``, else ``{}``
    ``memory_stats``                         resident set size (current, peak)   unknown
    ``save_memory``                          glibc: freed blocks >= 1 MiB go     nothing
                                             back to the system at once
    ``release_memory``                       glibc ``malloc_trim``, at most      nothing
                                             every ``TRIM_INTERVAL_S``
    ======================================  ==================================  =================

    Everything else is a no-op or "unknown" (``synchronize``, ``reset_peak_memory``,
    ``rng_state``, ``configure_model``, ``prepare``, ``materialize``, ``reduce_gradients``,
    ``step_end``, ``step_metrics``, ``peak_flops``): override what the device has. The built-in
    ``cpu`` backend adds only Intel Extension for PyTorch and its description to these defaults,
    so a third-party host backend that sets ``device_type = "cpu"`` runs as fast as it.
    """

    name: ClassVar[str]
    device_type: ClassVar[str]
    collective: ClassVar[str] = "gloo"
    _trim: Any = _UNSET  # glibc's malloc_trim (None without it), looked up at first use
    _last_trim = 0.0

    @classmethod
    def registration_problem(cls) -> str | None:
        """Why this class cannot be registered as a backend (``None``: it can)."""
        if not isinstance(getattr(cls, "device_type", None), str) or not cls.device_type:
            return ("set the class attribute device_type, the torch device type that device() "
                    "returns (e.g. 'cpu' or 'cuda'): the speed defaults of dpo.Backend follow it")
        return None

    # availability ------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """``None`` when usable here; otherwise one human sentence saying why not,
        e.g. ``"this torch build has no CUDA"``."""

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    @classmethod
    @abstractmethod
    def device_count(cls) -> int:
        """Devices of this kind visible to this process (0 when unavailable)."""

    # devices and numerics ----------------------------------------------------------------
    @abstractmethod
    def device(self, local_rank: int = 0) -> torch.device:
        """The device this process (local rank) trains on."""

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        """Compute dtypes this backend can train in (for ``--dtype``)."""
        return (torch.float32, torch.bfloat16) if self._on_host() else (torch.float32,)

    def default_dtype(self) -> torch.dtype:
        """What ``--dtype auto`` means here."""
        return torch.float32

    def autocast(self, dtype: torch.dtype) -> ContextManager[Any]:
        """Mixed precision context for the forward pass; a no-op for float32."""
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=dtype)

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""

    def memory_stats(self) -> MemoryStats:
        """On the host: the process's resident set size (a process's peak cannot be reset, so
        ``reset_peak_memory`` stays a no-op there)."""
        if not self._on_host():
            return MemoryStats(None, None)
        # Current first, then peak: the peak read afterwards can only be larger.
        current = _current_rss_bytes()
        peak = _peak_rss_bytes()
        if current is not None and peak is not None:
            peak = max(peak, current)
        return MemoryStats(current, peak)

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window (where the backend supports it)."""

    # device RNG, for exact resume ----------------------------------------------------------
    def rng_state(self) -> Any:
        """This device's random generator state (``None`` when it has none of its own)."""
        return None

    def set_rng_state(self, state: Any) -> None:
        """Restore what ``rng_state`` returned."""

    # shapes and kernels ---------------------------------------------------------------------
    def padded_length(self, longest: int) -> int:
        """The width of a batch whose longest row has ``longest`` tokens. Eager backends pad to
        the longest row; a compiling backend (XLA) rounds up to a few bucket widths, because
        each new shape costs a compile."""
        return longest

    #: Whether tensor shapes must not depend on tensor values: XLA compiles one graph per
    #: shape, and an op such as ``nonzero`` or boolean-mask indexing would read values on the
    #: host and give every batch a new shape. The hot path then uses masks instead.
    static_shapes: ClassVar[bool] = False
    @property
    def share_prompt_default(self) -> bool:
        """Whether runs share each pair's prompt between its completions unless told otherwise
        (``dpo.core.model.logps.shared_prompt_logps``): one prompt forward instead of two and no
        padding, at the price of a forward per pair instead of one per batch. Pays where
        batching gains little, the host (1.4x real tokens/s on HH-RLHF,
        ``benchmarks/techniques.py``); an accelerator keeps the batched path. A subclass may
        set a plain class attribute instead."""
        return self._on_host()

    def _on_host(self) -> bool:
        return getattr(self, "device_type", None) == HOST

    def save_memory(self) -> str | None:
        """The run trades speed for memory (``--gradient-checkpointing``, or ``--lora``): apply
        what this backend has for that to the process, before any model is loaded. Returns a short note
        for the log, or None when there is nothing to do.

        On the host: hand freed blocks of 1 MiB and more back to the system at once. glibc's
        malloc serves blocks from 128 KiB up with their own mapping, but raises that threshold
        (up to 32 MiB) each time such a block is freed, after which activations and gradients
        come from the heap, where a long-lived block between freed ones keeps them all
        resident: the peak resident memory of a step then exceeds what it holds by a third. A
        fixed threshold stops that (``mallopt(M_MMAP_THRESHOLD)``, which also turns the raising
        off). Measured on SmolLM2-135M with checkpointing (``benchmarks/vs_trl.py``): peak 3.26
        -> 2.97 GiB with the same step time; at 128 KiB 2.72 GiB but steps 40% slower (a fresh
        mapping's pages are faulted in at each use). Left alone where the user set
        ``MALLOC_MMAP_THRESHOLD_`` or the C library is not glibc."""
        if not self._on_host() or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
            return None
        mallopt = _glibc("mallopt")
        if mallopt is None:
            return None
        done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        return "freed blocks of 1 MiB and more go back to the system" if done == 1 else None

    def release_memory(self) -> None:
        """Hand what the step has freed back to the system. With ``--gradient-checkpointing``
        it is called in backward before each decoder layer runs again, so that the peak of a
        step is what the step holds rather than what it once held. Called often: keep it cheap,
        or let it skip calls.

        On the host: give the free parts of the heap back (glibc's ``malloc_trim``), at most
        once per ``TRIM_INTERVAL_S``. Blocks under the mmap threshold (a layer's activations for
        a few hundred tokens, the small weights' gradients) come from the heap, and glibc
        returns only its top: a block freed below a live one stays resident, and over a
        backward these holes add up to a quarter of a GiB on SmolLM2-135M. Measured with
        checkpointing on ``benchmarks/vs_trl.py``'s batches: peak 2.83 -> 2.60 GiB, steps about
        3% slower. Elsewhere nothing."""
        if not self._on_host():
            return
        if self._trim is _UNSET:
            self._trim = _glibc("malloc_trim")
        if self._trim is None or time.monotonic() - self._last_trim < TRIM_INTERVAL_S:
            return
        self._trim(0)
        self._last_trim = time.monotonic()

    def configure_model(self, model: torch.nn.Module) -> None:
        """Adapt a loaded model (policy or reference) to this backend in place, before training
        or evaluation; e.g. XLA switches to eager attention, whose masks need no host reads."""

    # hooks into the training step ----------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                dtype: torch.dtype = torch.float32):
        """A last optimisation pass over model and optimizer for training in ``dtype`` (e.g.
        Intel's ``ipex.optimize``); returns both. Say what was done in ``describe()``."""
        return model, optimizer

    def optimizer_options(self) -> dict[str, Any]:
        """Extra keywords for the AdamW the run builds: ``{"fused": True}`` where torch has a
        fused kernel for ``device_type`` (one pass over each parameter instead of several: 7x
        faster on the CPU on 135M parameters, ``benchmarks/techniques.py``), else none."""
        return {"fused": True} if self.device_type in _fused_adamw_devices() else {}

    def materialize(self) -> None:
        """Run the work queued so far. A no-op for eager backends; XLA cuts the graph here. The
        loop calls it after each micro-batch's backward and each evaluation batch (so that one
        graph covers one batch shape) and right before metrics are read on the host (so that
        reading them runs nothing twice)."""

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Average gradients over replicas that the backend's own runtime runs (XLA's PJRT
        processes), before clipping. A no-op where torch.distributed (DDP, FSDP) reduces them."""

    def step_end(self) -> None:
        """Called after every optimizer step (e.g. XLA's graph cut)."""

    def step_metrics(self) -> dict[str, float]:
        """Backend counters merged into each step's metrics (e.g. ``xla/compiles``)."""
        return {}

    def peak_flops(self, dtype: torch.dtype) -> float | None:
        """Dense peak FLOP/s of one device in ``dtype``, for MFU; ``None`` when unknown."""
        return None

    def describe(self) -> str:
        """A short human description of the device(s), for logs and ``run.json``."""
        return self.name


def _fused_adamw_devices() -> tuple[str, ...]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch that moved its private list
        return _FUSED_ADAMW_FALLBACK
    return tuple(_get_fused_kernels_supported_devices())


def _glibc(function: str) -> Any:
    """glibc's ``function`` (``mallopt``, ``malloc_trim``), or None where the C library is
    not glibc."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function)
    except (OSError, AttributeError):
        return None


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
