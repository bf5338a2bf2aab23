"""Per-epoch learning rates of the reference: warmup, then step, linear, cosine or exponential.

The LR is set once at the start of each epoch (not per iteration), as the reference does.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .cli import UserError

SCHEDULES = ("step", "linear", "cosine", "exponential")
STEP_MILESTONES = (30, 60, 80)


def lr_at(epoch: int, *, schedule: str, base_lr: float, epochs: int, warmup: int = 0, end_lr: float = 0.0,
          decay: float = 0.97, milestones: tuple[int, ...] = STEP_MILESTONES) -> float:
    """The learning rate of `epoch` (0-based)."""
    if schedule not in SCHEDULES:
        raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup > 0 and epoch < warmup:
        return base_lr * (epoch + 1) / warmup
    e = epoch - warmup
    span = epochs - warmup
    if schedule == "step":
        return base_lr * 0.1 ** sum(epoch >= m for m in milestones)
    if schedule == "exponential":
        return base_lr * decay ** e
    if span <= 0:
        return base_lr
    if schedule == "linear":
        return base_lr * (1 - e / span)
    return end_lr + 0.5 * (1 + math.cos(math.pi * e / span)) * (base_lr - end_lr)


def schedule_from_args(args) -> Callable[[int], float]:
    """epoch -> LR for main.py's flags."""
    def lr(epoch: int) -> float:
        return lr_at(epoch, schedule=args.lr_schedule, base_lr=args.lr, epochs=args.epochs, warmup=args.warmup,
                     end_lr=args.end_lr, decay=args.lr_decay)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group the LR `lr`, times its `lr_scale` where it has one (fine-tuning's factors)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
