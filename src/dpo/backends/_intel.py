"""Intel Extension for PyTorch (IPEX), shared by the cpu and xpu backends.

Applied automatically when it is installed and loads with this torch: installing it is the
opt-in (nothing else pulls it in), and ``DPO_IPEX=0`` turns it off. It is imported here, inside
functions, never when a backend module is imported, and only after its version has been checked
against torch's from the installed metadata: a mismatched IPEX prints an error and fails inside
its own import.

``ipex.optimize`` with an optimizer prepares training: fused optimizer updates, and for bf16,
bf16 weights with float32 master copies kept by the optimizer. Prepacking bf16 weights into
oneDNN's blocked layout needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; elsewhere it is turned off
(``weights_prepack=False``) rather than letting ``ipex.optimize`` fail.

Once imported, IPEX registers its own ``layer_norm`` kernel without an autograd entry, and torch
warns at every backward through a LayerNorm (GPT-2, GPT-NeoX, BTLM, ...) that backprop "may be
silently incorrect". It is not: autograd falls back to the composite formula, and
``tests/test_intel.py`` checks that the gradients of a LayerNorm model with IPEX imported equal
those without it, in float32 and under bf16 autocast. So that one warning is silenced where IPEX
is applied (``LAYER_NORM_WARNING``); no other.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

DISTRIBUTION = "intel-extension-for-pytorch"
LAYER_NORM_WARNING = r"aten::layer_norm: an autograd kernel was not registered"
SWITCH = "DPO_IPEX"  # "0" (or false/no/off): never apply it

# What oneDNN needs for bf16 weight prepacking (the same rule IPEX checks before prepacking).
_AVX512_BF16_PREPACK = frozenset({"avx512bw", "avx512vl", "avx512dq"})
_NE_CONVERT = "avx_ne_convert"


@dataclass
class IntelStatus:
    """What happened, or would happen, with IPEX in this process: ``note`` is one line for logs
    and ``run.json`` (``None``: not installed, nothing to say)."""

    applied: bool = False
    note: str | None = None


def installed_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _minor(version: str) -> str:
    match = re.match(r"(\d+\.\d+)", version)
    return match.group(1) if match else version


def switched_off() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() in ("0", "false", "no", "off")


def problem() -> str | None:
    """Why IPEX will not be applied here, without importing it (``None``: it will be tried).
    Not installed is not a problem: there is simply nothing to apply."""
    version = installed_version()
    if version is None:
        return None
    if switched_off():
        return f"{DISTRIBUTION} {version} installed, not applied ({SWITCH}=0)"
    if _minor(version) != _minor(torch.__version__):
        return (f"{DISTRIBUTION} {version} needs torch {_minor(version)}.*, not "
                f"{torch.__version__}: not applied")
    return None


def load() -> tuple[ModuleType | None, str | None]:
    """(the ipex module, None), or (None, why not; None when it is simply not installed)."""
    if installed_version() is None:
        return None, None
    reason = problem()
    if reason is not None:
        return None, reason
    try:
        import intel_extension_for_pytorch as ipex
    except Exception as exc:  # e.g. it imports transformers internals that have moved
        first = " ".join(str(exc).split()[:25]) or type(exc).__name__
        return None, (f"{DISTRIBUTION} {installed_version()} does not load here "
                      f"({type(exc).__name__}: {first}): not applied")
    return ipex, None


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The instruction-set flags of the first CPU (Linux); ``None`` where unreadable."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def bf16_prepack_supported(flags: frozenset[str] | None = None) -> bool:
    """Whether oneDNN can prepack bf16 weights here: AVX-512 BW+VL+DQ or AVX-NE-CONVERT. Without
    /proc/cpuinfo, torch's own dispatch level stands in (``AVX512`` implies BW, VL and DQ)."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return _AVX512_BF16_PREPACK <= flags or _NE_CONVERT in flags


def optimize(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             dtype: torch.dtype, device_type: str = "cpu"):
    """``ipex.optimize`` for training (with an optimizer) or inference (without), when IPEX is
    usable; returns (model, optimizer, IntelStatus)."""
    ipex, reason = load()
    if ipex is None:
        return model, optimizer, IntelStatus(False, reason)
    warnings.filterwarnings("ignore", message=LAYER_NORM_WARNING, category=UserWarning)
    kwargs = {}
    detail = str(dtype).removeprefix("torch.")
    if device_type == "cpu" and dtype == torch.bfloat16 and not bf16_prepack_supported():
        kwargs["weights_prepack"] = False
    # IPEX checks the mode against the presence of an optimizer.
    model.train(optimizer is not None)
    if optimizer is None:
        model = ipex.optimize(model, dtype=dtype, inplace=True, **kwargs)
    else:
        model, optimizer = ipex.optimize(model, optimizer=optimizer, dtype=dtype, inplace=True,
                                         **kwargs)
    if "weights_prepack" in kwargs:
        detail += (", weights not prepacked: bf16 prepacking needs AVX-512 BW/VL/DQ or "
                   "AVX-NE-CONVERT, which this CPU lacks")
    else:
        # Prepacked layers are IPEX's own modules; which layers qualify is IPEX's choice.
        packed = sum(type(m).__module__.startswith("intel_extension_for_pytorch")
                     for m in model.modules())
        detail += f", {packed} layers prepacked"
    mode = "training" if optimizer is not None else "inference"
    return model, optimizer, IntelStatus(
        True, f"{DISTRIBUTION} {ipex.__version__} applied ({mode}, {detail})")
