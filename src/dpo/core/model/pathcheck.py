"""The check on real data (the third layer of ``dpo.core.model.paths``): before the first step,
the speed paths' log-probs of one small batch against the plain path's; a path that differs is
turned off."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo.core.data.batching import Batch
from dpo.core.interfaces.errors import UsageError
from dpo.core.model.logps import batch_logps
from dpo.core.model.paths import PLAIN, Paths

# Summed log-probs of a completion agree within this between two exact paths in float32
# (different kernels sum in different orders: 1e-7 relative on SmolLM2's completions); the
# errors this check exists for are nats.
CHECK_RTOL = 1e-4
CHECK_ATOL = 1e-3
CHECK_PAIRS = 4


@dataclass
class CheckReport:
    pairs: int = 0  # the examples checked: pairs, or (``unit`` examples) single rows
    unit: str = "pairs"
    max_difference: float = 0.0
    seconds: float = 0.0
    turned_off: dict[str, float] = field(default_factory=dict)  # path -> its difference

    def record(self) -> dict[str, Any]:
        """For ``run.json`` (strict JSON: a path that failed to run shows as null)."""
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {self.unit: self.pairs, "max_difference": finite(self.max_difference),
                "seconds": round(self.seconds, 3),
                "turned_off": {k: finite(v) for k, v in self.turned_off.items()}}


def check(model: torch.nn.Module, batch: Batch, paths: Paths, training: bool = True
          ) -> tuple[Paths, CheckReport]:
    """Compare ``paths``' log-probs of ``batch`` with the plain path's: without a gradient, in
    float32, the model as training runs it (in training mode, with ``training``) against the
    plain path (each sequence alone) in eval mode.
    A path that fails (differs beyond ``CHECK_ATOL + CHECK_RTOL |plain|``, or raises) is turned
    off: the first whose removal brings the two together, or every one where none does.
    Returns the paths to use and what was found; the cost is a forward of ``batch`` on the
    paths and one of each of its sequences alone (more only where a path fails). A model
    whose plain path itself differs in training mode (some randomness ``disable_dropout`` did
    not reach) is refused: DPO needs deterministic log-probs."""
    started = time.perf_counter()
    report = CheckReport(pairs=batch.num_pairs if batch.paired else batch.rows,
                         unit="pairs" if batch.paired else "examples")
    if paths.used():
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()
                want = _logps_of(model, batch, PLAIN)
                model.train(training)
                report.max_difference, fails = _compare(model, batch, paths, want)
                if fails:
                    culprit = None
                    for name in ("shared_prompt", "packed_rows", "tied_buffer", "unmasked",
                                 "chunked_head", "batched"):
                        if getattr(paths, name) and not _compare(
                                model, batch, paths.without([name], ""), want)[1]:
                            culprit = name
                            break
                    if culprit is None and training:
                        plain, fails = _compare(model, batch, PLAIN, want)
                        if fails:
                            raise UsageError(
                                f"{type(model).__name__} computes different log-probs in "
                                f"training mode than in eval mode even with every dropout "
                                f"probability at 0 ({plain:.3g} nats apart on the first "
                                f"{report.unit}): something in it is random while training, "
                                "and training needs deterministic log-probs")
                    names = [culprit] if culprit else paths.used()
                    report.turned_off = {name: report.max_difference for name in names}
                    reason = (f"its log-probs differed from the plain path's by "
                              f"{report.max_difference:.3g} nats on {report.pairs} {report.unit}"
                              if math.isfinite(report.max_difference) else
                              "it failed to run this model or gave non-finite log-probs")
                    paths = dataclasses.replace(paths.without(names, reason),
                                                inexact=paths.inexact | set(names))
        finally:
            model.train(was_training)
    report.seconds = time.perf_counter() - started
    return paths, report


def _logps_of(model: torch.nn.Module, batch: Batch, paths: Paths) -> torch.Tensor:
    return batch_logps(model, batch, paths)[0].float()


def _compare(model, batch, paths, want) -> tuple[float, bool]:
    """(largest difference, whether beyond tolerance) of ``paths``' log-probs from ``want``."""
    try:
        got = _logps_of(model, batch, paths)
    except Exception:  # noqa: BLE001 - a path that cannot run this model is a failed path
        return math.inf, True
    if got.shape != want.shape or not torch.isfinite(got).all():
        return math.inf, True
    difference = (got - want).abs()
    return float(difference.max()), bool((difference > CHECK_ATOL + CHECK_RTOL * want.abs()).any())
