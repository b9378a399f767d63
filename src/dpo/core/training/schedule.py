"""Learning-rate schedules: linear warmup, then linear or cosine decay to zero, or constant."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based optimizer steps)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kind, warmup, total))


def set_peak_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> bool:
    """Make ``lr`` the peak learning rate of a scheduler restored from a checkpoint (a resumed
    run given a new --lr, e.g. after a diverged update), at the schedule's current point.
    Returns whether anything changed; with the recorded --lr a resume stays exact."""
    if all(base == lr for base in scheduler.base_lrs):
        return False
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    factors = [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, factor in zip(scheduler.optimizer.param_groups, factors):
        group["initial_lr"], group["lr"] = lr, lr * factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    return True
