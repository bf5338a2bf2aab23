"""Per-epoch learning rates of the reference: warmup, then step, linear, cosine or exponential.

The LR is set once at the start of each epoch (not per iteration), as the reference does. A schedule is one
entry of LR_SCHEDULES: a function of (epoch after warmup, epochs after warmup, the schedule's settings) to the
LR, with --lr-schedule's choices and error message coming from the registry.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import Config
from ..registry import Registry

STEP_MILESTONES = (30, 60, 80)


@dataclass(frozen=True)
class LRSchedule:
    """A run's LR settings: `lr_of(epoch)` is the LR of that epoch (0-based)."""

    schedule: str
    base_lr: float
    epochs: int
    warmup: int = 0
    end_lr: float = 0.0
    decay: float = 0.97
    milestones: tuple[int, ...] = STEP_MILESTONES

    @classmethod
    def from_config(cls, config: Config) -> "LRSchedule":
        return cls(schedule=config.schedule.lr_schedule, base_lr=config.optim.lr, epochs=config.schedule.epochs,
                   warmup=config.schedule.warmup, end_lr=config.schedule.end_lr, decay=config.schedule.lr_decay)

    def lr_of(self, epoch: int) -> float:
        shape = LR_SCHEDULES.get(self.schedule)
        if self.warmup > 0 and epoch < self.warmup:
            return self.base_lr * (epoch + 1) / self.warmup
        return shape(self, epoch - self.warmup, self.epochs - self.warmup)


LR_SCHEDULES: Registry[Callable[[LRSchedule, int, int], float]] = Registry("LR schedule", flag="--lr-schedule")


@LR_SCHEDULES.register("step")
def step(s: LRSchedule, e: int, span: int) -> float:
    """x0.1 at each milestone epoch (counted with the warmup)."""
    return s.base_lr * 0.1 ** sum(e + s.warmup >= m for m in s.milestones)


@LR_SCHEDULES.register("linear")
def linear(s: LRSchedule, e: int, span: int) -> float:
    """From the base LR to 0."""
    return s.base_lr if span <= 0 else s.base_lr * (1 - e / span)


@LR_SCHEDULES.register("cosine")
def cosine(s: LRSchedule, e: int, span: int) -> float:
    """From the base LR to --end-lr along half a cosine."""
    if span <= 0:
        return s.base_lr
    return s.end_lr + 0.5 * (1 + math.cos(math.pi * e / span)) * (s.base_lr - s.end_lr)


@LR_SCHEDULES.register("exponential")
def exponential(s: LRSchedule, e: int, span: int) -> float:
    """x --lr-decay every epoch."""
    return s.base_lr * s.decay ** e


def lr_at(epoch: int, *, schedule: str, base_lr: float, epochs: int, warmup: int = 0, end_lr: float = 0.0,
          decay: float = 0.97, milestones: tuple[int, ...] = STEP_MILESTONES) -> float:
    """The learning rate of `epoch` (0-based)."""
    return LRSchedule(schedule, base_lr, epochs, warmup, end_lr, decay, milestones).lr_of(epoch)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group the LR `lr`, times its `lr_scale` where it has one (fine-tuning's factors)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR set_lr gave: the first group's, without its `lr_scale`."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)
