"""Shared pieces of the policies that watch one metric."""

from __future__ import annotations

import math
from typing import Literal

from dpo.core.interfaces.errors import DpoError, UsageError

Mode = Literal["max", "min"]


def read_metric(policy: str, metric: str, metrics: dict[str, float]) -> float:
    """``metrics[metric]``, or a clear error naming what is reported instead."""
    if metric not in metrics:
        shown = ", ".join(sorted(k for k in metrics if k.startswith("eval/") == metric.startswith("eval/")))
        raise DpoError(f"stopping policy {policy!r} watches {metric!r}, which this run does not "
                       f"report; reported: {shown or 'none'}; set -o {policy}.metric=NAME")
    return float(metrics[metric])


def is_eval_metric(metric: str) -> bool:
    return metric.startswith("eval/")


Source = Literal["auto", "eval", "train"]


def resolve_source(policy: str, source: Source, holds_out: bool) -> str:
    """The metric prefix a policy reads: ``"eval/"`` (its evaluations) or ``""`` (its training
    steps). ``auto`` takes the evaluations when the run holds out data, else the steps."""
    if source == "auto":
        return "eval/" if holds_out else ""
    if source == "eval" and not holds_out:
        raise UsageError(f"--stop {policy} with metric_source=eval needs held-out data: give "
                         f"--eval-data or --eval-fraction, or set -o {policy}.metric_source=train")
    return "eval/" if source == "eval" else ""


def preference_only(policy: str, objective: str) -> None:
    """A one-line error for a policy on preference metrics in a run that reports none."""
    if objective != "dpo":
        raise UsageError(f"--stop {policy} watches preference metrics (rewards/..., logps/...), "
                         f"which dpo {objective} does not report; drop --stop {policy}")


def improves(value: float, best: float | None, mode: Mode, min_delta: float) -> bool:
    """Whether ``value`` beats ``best`` (None: nothing yet) by more than ``min_delta`` in
    ``mode``; a non-finite value never does."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    delta = value - best if mode == "max" else best - value
    return delta > min_delta
