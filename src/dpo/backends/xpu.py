"""Intel GPUs through torch's native ``torch.xpu`` (torch >= 2.4; no extension needed).

``torch.xpu`` mirrors ``torch.cuda``, so devices, dtypes, autocast, memory and RNG come from
``_DeviceModuleBackend``; this module adds the probe and the messages.
"""

from __future__ import annotations

import torch

from dpo.backends.cuda import _DeviceModuleBackend
from dpo.core.hookspecs import hookimpl


class XPUBackend(_DeviceModuleBackend):
    """Intel Data Center / Arc GPUs; collectives through oneCCL (``xccl``)."""

    name = "xpu"
    collective = "xccl"
    _device_type = "xpu"
    _kind = "Intel XPU"
    # Level Zero's device mask; ONEAPI_DEVICE_SELECTOR filters at the SYCL level.
    _visibility_vars = ("ZE_AFFINITY_MASK", "ONEAPI_DEVICE_SELECTOR")
    _listing_tool = "xpu-smi discovery"

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

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        """Identity for now. The Intel Extension pass (``ipex.optimize``, imported here and only
        here) slots in once its lane pins a torch it loads with: IPEX 2.8 needs torch 2.8.x,
        and its bf16 weight prepack needs AVX-512 or ``weights_prepack=False``."""
        return model, optimizer


@hookimpl
def dpo_register_backends(register):
    register(XPUBackend)
