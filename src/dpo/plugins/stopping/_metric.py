"""Shared pieces of the policies that watch one metric."""

from __future__ import annotations

from typing import Literal

from dpo.core.interfaces.errors import DpoError

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
