"""Intel GPUs through torch's native ``torch.xpu`` (torch >= 2.4; no extension needed).

``torch.xpu`` mirrors ``torch.cuda``, so devices, dtypes, autocast, memory statistics
(``torch.xpu.memory_allocated`` and its peak) and RNG come from ``_DeviceModuleBackend``; this
module adds the probe, the messages, the peak table and, where an XPU build of Intel Extension
for PyTorch is installed, its ``ipex.optimize`` pass (``dpo.backends._intel``). Collectives go
through oneCCL, which torch.distributed names ``xccl``.
"""

from __future__ import annotations

import torch

from dpo.backends import _intel
from dpo.backends.cuda import Peak, _DeviceModuleBackend
from dpo.core.interfaces.hookspecs import hookimpl


# Dense peaks of the Data Center GPU Max parts (both stacks), from their engine counts at peak
# clock: 512 bf16 FLOP per clock per XMX engine, 32 fp32 FLOP per clock per vector engine.
_INTEL_PEAKS: tuple[tuple[str, Peak], ...] = (
    (r"\bMax 1550\b", Peak(1024 * 512 * 1.6e9, 1024 * 32 * 1.6e9)),  # 838.9 / 52.4 TFLOP/s
    (r"\bMax 1100\b", Peak(448 * 512 * 1.55e9, 448 * 32 * 1.55e9)),  # 355.5 / 22.2 TFLOP/s
)


class XPUBackend(_DeviceModuleBackend):
    """Intel Data Center / Arc GPUs; collectives through oneCCL (``xccl``)."""

    name = "xpu"
    collective = "xccl"
    device_type = "xpu"
    _kind = "Intel XPU"
    # Level Zero's device mask; ONEAPI_DEVICE_SELECTOR filters at the SYCL level.
    _visibility_vars = ("ZE_AFFINITY_MASK", "ONEAPI_DEVICE_SELECTOR")
    _listing_tool = "xpu-smi discovery"
    _peaks = _INTEL_PEAKS

    def __init__(self) -> None:
        super().__init__()
        self._intel: _intel.IntelStatus | None = None  # set by prepare()

    @classmethod
    def _build_problem(cls) -> str | None:
        xpu = getattr(torch, "xpu", None)
        # Every recent torch has a torch.xpu module; only XPU builds have it compiled in.
        compiled = getattr(xpu, "_is_compiled", None)
        if xpu is None or (compiled is not None and not compiled()):
            return "this torch build has no XPU support"
        return None

    @classmethod
    def _runtime(cls) -> str:
        return f"XPU {getattr(torch.version, 'xpu', None) or 'runtime'}"

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                dtype: torch.dtype = torch.float32):
        """Intel Extension for PyTorch's pass where it is installed and matches torch (IPEX
        leaves prepacking off on XPU by itself); otherwise plain ``torch.xpu``. Only for a model
        on an XPU device: a CPU-only IPEX build must not treat it as a CPU model."""
        if not any(p.device.type == "xpu" for p in model.parameters()):
            return model, optimizer
        model, optimizer, self._intel = _intel.optimize(model, optimizer, dtype, "xpu")
        return model, optimizer

    def describe(self) -> str:
        text = super().describe()
        note = self._intel.note if self._intel is not None else None
        return f"{text}; {note}" if note else text


@hookimpl
def dpo_register_backends(register):
    register(XPUBackend)
