"""AMD GPUs on a ROCm build of torch.

ROCm builds expose AMD GPUs as torch ``cuda`` devices and RCCL as ``nccl``, so the device,
memory, autocast and RNG code is the CUDA backend's (``_CudaLikeBackend``); only the probe, the
messages and the peak table differ. A separate name keeps ``--backend rocm`` honest: it refuses
a CUDA build instead of quietly running on an NVIDIA GPU.
"""

from __future__ import annotations

import torch

from dpo.backends.cuda import Peak, _CudaLikeBackend
from dpo.core.interfaces.hookspecs import hookimpl

# Dense matrix-core peaks from AMD Instinct datasheets. Some ROCm releases name an MI250 "AMD
# Instinct MI250X/MI250", which the MI250X row then claims: MFU reads slightly low there.
_AMD_PEAKS: tuple[tuple[str, Peak], ...] = (
    (r"\bMI325X\b", Peak(1307.4e12, 163.4e12)),
    (r"\bMI300X\b", Peak(1307.4e12, 163.4e12)),
    (r"\bMI300A\b", Peak(980.6e12, 122.6e12)),
    (r"\bMI250X\b", Peak(383e12, 95.7e12)),
    (r"\bMI250\b", Peak(362.1e12, 90.5e12)),
    (r"\bMI210\b", Peak(181e12, 45.3e12)),
)


class ROCmBackend(_CudaLikeBackend):
    """AMD GPUs through HIP; torch calls them ``cuda`` devices."""

    name = "rocm"
    _kind = "ROCm"
    # ROCm honours all three; HIP_/ROCR_ are the native ones, CUDA_ is kept for portability.
    _visibility_vars = ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
    _listing_tool = "rocm-smi"
    _peaks = _AMD_PEAKS

    @classmethod
    def _build_problem(cls) -> str | None:
        if getattr(torch.version, "hip", None):
            return None
        if torch.version.cuda is not None:
            return "this torch build is for CUDA, not ROCm; install a ROCm build of torch"
        return "this torch build has no ROCm (HIP) support"

    @classmethod
    def _runtime(cls) -> str:
        return f"HIP {torch.version.hip}"


@hookimpl
def dpo_register_backends(register):
    register(ROCmBackend)
