"""NVIDIA GPUs through torch.cuda, and the base class the ROCm and XPU backends share.

torch's device modules have one API: ROCm builds drive AMD GPUs through ``torch.cuda`` itself
(devices are named ``cuda``, RCCL answers to ``nccl``) and ``torch.xpu`` mirrors ``torch.cuda``
for Intel GPUs. So device selection, dtypes, autocast, memory, RNG and the description live once
in ``_DeviceModuleBackend``; each backend adds its build probe, messages and peak-FLOPs table.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, ContextManager

import torch

from dpo.core.interfaces.backend import Backend, MemoryStats
from dpo.core.interfaces.errors import UsageError
from dpo.core.interfaces.hookspecs import hookimpl


@dataclass(frozen=True)
class Peak:
    """Dense peak FLOP/s of one device: ``half`` on the bf16/fp16 tensor (matrix) cores,
    ``fp32`` plain float32 without TF32 (torch's default for float32 matmuls)."""

    half: float
    fp32: float | None = None
    bf16: bool = True

    def for_dtype(self, dtype: torch.dtype) -> float | None:
        if dtype == torch.float16 or (dtype == torch.bfloat16 and self.bf16):
            return self.half
        if dtype == torch.float32:
            return self.fp32
        return None


class _DeviceModuleBackend(Backend):
    """A backend driven through a torch device module with the ``torch.cuda`` API."""

    # Subclasses fill these in.
    device_type: ClassVar[str]  # torch's device type and module name: "cuda", "xpu"
    _kind: ClassVar[str]  # how messages name the devices: "CUDA", "ROCm", "Intel XPU"
    _visibility_vars: ClassVar[tuple[str, ...]]
    _listing_tool: ClassVar[str]  # the vendor's command that lists GPUs, for the hint
    _peaks: ClassVar[tuple[tuple[str, Peak], ...]] = ()  # (regex on the device name, peak)

    def __init__(self) -> None:
        self._index: int | None = None  # set by device(); until then, torch's current device
        self._dtypes: tuple[torch.dtype, ...] | None = None  # autocast asks every micro-batch

    @classmethod
    def _module(cls) -> Any:
        """``torch.cuda`` or ``torch.xpu``; looked up on each call so tests can patch it."""
        return getattr(torch, cls.device_type)

    @classmethod
    @abstractmethod
    def _build_problem(cls) -> str | None:
        """Why this torch build cannot serve this backend at all (``None``: it can)."""

    @classmethod
    def unavailable_reason(cls) -> str | None:
        problem = cls._build_problem()
        if problem is not None:
            return problem
        # A driver that is missing or too old shows up as a warning from is_available(); keep
        # it for the message instead of letting it escape (tests turn warnings into errors).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cls._module().is_available():
                return None
        return cls._no_device_reason([str(w.message) for w in caught])

    @classmethod
    def _no_device_reason(cls, warned: list[str]) -> str:
        settings = [f'{var}="{os.environ[var]}"' for var in cls._visibility_vars
                    if var in os.environ]
        reason = f"no {cls._kind} device is visible"
        if settings:
            reason += f" ({', '.join(settings)})"
        problem = _driver_problem(cls._module(), warned)
        if problem:
            return f"{reason}: {problem}"
        if not settings:
            return (f"{reason} (is a GPU attached and its driver loaded? "
                    f"`{cls._listing_tool}` should list it)")
        return reason

    @classmethod
    def device_count(cls) -> int:
        return cls._module().device_count() if cls.is_available() else 0

    def device(self, local_rank: int = 0) -> torch.device:
        reason = self.unavailable_reason()
        if reason is not None:
            raise UsageError(f"backend {self.name!r} is not available: {reason}")
        module = self._module()
        count = module.device_count()
        if not 0 <= local_rank < count:
            raise UsageError(f"local rank {local_rank} needs {local_rank + 1} {self._kind} "
                             f"devices, but {count} are visible")
        # Make it current so that kernels, collectives and allocations without an explicit
        # index land on this rank's GPU rather than all on GPU 0.
        module.set_device(local_rank)
        self._index = local_rank
        return torch.device(self.device_type, local_rank)

    def _current(self) -> int:
        return self._index if self._index is not None else self._module().current_device()

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if self._dtypes is None:
            if not self.is_available():
                return (torch.float32,)
            bf16 = (torch.bfloat16,) if self._bf16_supported() else ()
            self._dtypes = (torch.float32, *bf16, torch.float16)
        return self._dtypes

    def _bf16_supported(self) -> bool:
        module = self._module()
        try:
            # Without emulation: pre-Ampere NVIDIA GPUs "support" bf16 only by slow emulation.
            return bool(module.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch.xpu of older torch releases takes no argument
            return bool(module.is_bf16_supported())

    def default_dtype(self) -> torch.dtype:
        # bf16 needs no loss scaling and runs on tensor cores; fp16 would need a GradScaler.
        return torch.bfloat16 if torch.bfloat16 in self.supported_dtypes() else torch.float32

    def autocast(self, dtype: torch.dtype) -> ContextManager[Any]:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        supported = self.supported_dtypes()
        if dtype not in supported:
            names = ", ".join(str(d).removeprefix("torch.") for d in supported)
            raise ValueError(f"the {self.name} backend cannot train in {dtype} here "
                             f"(supported: {names})")
        return torch.autocast(self.device_type, dtype=dtype)

    def synchronize(self) -> None:
        self._module().synchronize(self._current())

    def memory_stats(self) -> MemoryStats:
        if not self.is_available():
            return MemoryStats(None, None)
        # The caching allocator's view: tensors only, not the allocator's reserve or the context.
        module, index = self._module(), self._current()
        return MemoryStats(module.memory_allocated(index), module.max_memory_allocated(index))

    def reset_peak_memory(self) -> None:
        if self.is_available():
            self._module().reset_peak_memory_stats(self._current())

    def rng_state(self) -> Any:
        """One generator state per visible device (a list of CPU byte tensors)."""
        return self._module().get_rng_state_all() if self.is_available() else None

    def set_rng_state(self, state: Any) -> None:
        if state is not None:
            self._module().set_rng_state_all(state)

    def peak_flops(self, dtype: torch.dtype) -> float | None:
        if not self.is_available():
            return None
        device_name = self._module().get_device_name(self._current())
        for pattern, peak in self._peaks:
            if re.search(pattern, device_name, flags=re.IGNORECASE):
                return peak.for_dtype(dtype)
        return None

    @classmethod
    @abstractmethod
    def _runtime(cls) -> str:
        """The vendor runtime torch was built against, e.g. ``CUDA 12.8`` (for describe)."""

    def describe(self) -> str:
        reason = self.unavailable_reason()
        if reason is not None:
            return f"{self.name} (unavailable: {reason})"
        module = self._module()
        names = Counter(module.get_device_name(i) for i in range(module.device_count()))
        devices = ", ".join(f"{n} x {name}" for name, n in names.items())
        return f"{self.name} ({self._runtime()}): {devices}"


def _driver_problem(module: Any, warned: list[str]) -> str | None:
    """One line from torch saying why it found no device (no driver, driver too old, ...)."""
    messages = list(warned)
    try:
        # Initialising raises the underlying error (e.g. "Found no NVIDIA driver ...").
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module.init()
        messages += [str(w.message) for w in caught]
    except Exception as exc:
        messages.insert(0, str(exc))
    for message in messages:
        line = " ".join(message.strip().splitlines()[0].split()) if message.strip() else ""
        line = line.removeprefix("CUDA initialization: ")
        # Says nothing the caller's "no device is visible" does not already say.
        if line and not re.fullmatch(r"No (CUDA|HIP|XPU) (GPUs|devices) (are|is) available",
                                     line, flags=re.IGNORECASE):
            return line
    return None


# Dense (no structured sparsity) peaks from the vendor datasheets (RTX 4090: NVIDIA's Ada
# whitepaper, fp32 accumulate). First match wins, so specific names come before general ones.
_NVIDIA_PEAKS: tuple[tuple[str, Peak], ...] = (
    (r"\bB200\b", Peak(2250e12)),
    (r"\bH100\b.*\bNVL\b", Peak(835e12, 60e12)),
    (r"\bH100\b.*\bPCIe\b", Peak(756e12, 51e12)),
    (r"\bH100\b", Peak(989e12, 67e12)),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    (r"\bH200\b.*\bNVL\b", Peak(835e12, 60e12)),
    (r"\bH200\b", Peak(989e12, 67e12)),
    (r"\bGH200\b", Peak(989e12, 67e12)),
    (r"\bA100\b", Peak(312e12, 19.5e12)),
    (r"\bA30\b", Peak(165e12, 10.3e12)),
    (r"\bA10\b", Peak(125e12, 31.2e12)),  # not A10G, which has no public datasheet figure
    (r"\bL40S\b", Peak(362e12, 91.6e12)),
    (r"\bL40\b", Peak(181e12, 90.5e12)),
    (r"\bL4\b", Peak(121e12, 30.3e12)),
    (r"\bRTX 4090\b", Peak(165.2e12, 82.6e12)),
    (r"\bV100S\b", Peak(130e12, 16.4e12, bf16=False)),
    (r"\bV100\b.*\bPCIe\b", Peak(112e12, 14e12, bf16=False)),
    (r"\bV100\b", Peak(125e12, 15.7e12, bf16=False)),
    (r"\bT4\b", Peak(65e12, 8.1e12, bf16=False)),
)


class _CudaLikeBackend(_DeviceModuleBackend):
    """Devices that torch calls ``cuda``: NVIDIA GPUs on CUDA builds, AMD GPUs on ROCm builds."""

    device_type = "cuda"
    collective = "nccl"  # NCCL on CUDA builds, RCCL under the same name on ROCm builds


class CUDABackend(_CudaLikeBackend):
    """NVIDIA GPUs on a CUDA build of torch."""

    name = "cuda"
    _kind = "CUDA"
    _visibility_vars = ("CUDA_VISIBLE_DEVICES",)
    _listing_tool = "nvidia-smi"
    _peaks = _NVIDIA_PEAKS

    @classmethod
    def _build_problem(cls) -> str | None:
        if getattr(torch.version, "hip", None):
            return "this is a ROCm build of torch; use --backend rocm"
        if torch.version.cuda is None:
            return "this torch build has no CUDA"
        return None

    @classmethod
    def _runtime(cls) -> str:
        return f"CUDA {torch.version.cuda}"


@hookimpl
def dpo_register_backends(register):
    register(CUDABackend)
