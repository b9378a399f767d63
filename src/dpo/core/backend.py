"""The Backend interface: everything that differs between accelerators.

Vendor SDKs (torch_xla, intel_extension_for_pytorch, ...) are imported inside methods, never at
module import, so that listing backends works on any machine.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, ContextManager

import torch


@dataclass(frozen=True)
class MemoryStats:
    """Bytes of memory in use now and at the peak since the last reset (``None``: unknown)."""

    current_bytes: int | None
    peak_bytes: int | None


class Backend(ABC):
    """A hardware backend plugin.

    Subclasses set ``name`` (the ``--backend`` value), ``collective`` (the torch.distributed
    backend: gloo, nccl, xccl, xla) and implement the availability probe and device methods.
    """

    name: ClassVar[str]
    collective: ClassVar[str] = "gloo"

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
        return (torch.float32,)

    def default_dtype(self) -> torch.dtype:
        """What ``--dtype auto`` means here."""
        return torch.float32

    def autocast(self, dtype: torch.dtype) -> ContextManager[Any]:
        """Mixed precision context for the forward pass; a no-op for float32."""
        return contextlib.nullcontext()

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""

    def memory_stats(self) -> MemoryStats:
        return MemoryStats(None, None)

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
    # Whether runs share each pair's prompt between its completions unless told otherwise
    # (``dpo.core.logps.shared_prompt_logps``): one prompt forward instead of two and no
    # padding, at the price of a forward per pair instead of one per batch. Pays where batching
    # gains little (a CPU); an accelerator keeps the batched path by default.
    share_prompt_default: ClassVar[bool] = False

    def save_memory(self) -> str | None:
        """The run trades speed for memory (``--gradient-checkpointing``): apply what this
        backend has for that to the process, before any model is loaded. Returns a short note
        for the log, or None when there is nothing to do (the default)."""
        return None

    def release_memory(self) -> None:
        """Hand what the step has freed back to the system. With ``--gradient-checkpointing``
        it is called in backward before each decoder layer runs again, so that the peak of a
        step is what the step holds rather than what it once held. Called often: keep it cheap,
        or let it skip calls. The default does nothing."""

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
        """Extra keywords for the AdamW the run builds, e.g. ``{"fused": True}`` where torch
        has a fused kernel for this device."""
        return {}

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
