"""What a run is made of: the trainer (model, loss, optimizer), the run state a checkpoint restores, and the stop
request of SIGTERM/SIGINT."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field

import torch
from torch import nn

from ..context import ExecutionContext
from ..data.erasing import RandomErasing
from ..data.mixup import Mixup
from ..metrics import all_reduce_sum
from .losses import TrainingLoss


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and returns. A second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, ctx: ExecutionContext) -> bool:
        """Whether any process was asked to stop (a collective in distributed runs)."""
        if not ctx.distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=ctx.device)
        return bool(all_reduce_sum(flag).item() > 0)


@dataclass
class RunState:
    """What the loop carries from epoch to epoch and what a checkpoint restores."""

    epoch: int = 0                   # next epoch to run
    iteration: int = 0               # next batch of `epoch` (non-zero only after a mid-epoch stop)
    best_prec1: float = 0.0
    validated: bool = False          # whether best_prec1 comes from a validation (the first one is always best)
    optimizer_steps: int = 0
    # Iterations whose gradients wait for the next optimizer step. Counted over the run, as the reference's
    # Trainer counts: where an epoch's length is not a multiple of the accumulation, a step's batches straddle
    # the epoch boundary, and a checkpoint written in between holds their gradients.
    accumulated: int = 0
    epochs_without_improvement: int = 0
    data_seed: int = 0
    history: list = field(default_factory=list)   # epoch records, for the run summary (kept across --resume)
    # The epoch's loss sums so far, set by a mid-epoch stop and restored by --resume so that the epoch's train.loss
    # is the uninterrupted run's.
    epoch_meter: dict | None = None


@dataclass
class Trainer:
    """The model and what trains it."""

    ctx: ExecutionContext
    model: nn.Module                 # unwrapped (what checkpoints hold)
    train_model: nn.Module           # scripted/compiled/DDP-wrapped view used in the loop
    loss: TrainingLoss               # the training loss (validation reads its criterion in eval mode)
    scaler: torch.amp.GradScaler
    optimizer: torch.optim.Optimizer | None = None   # None with --evaluate
    accumulation: int = 1            # iterations per optimizer step
    mixup: Mixup | None = None       # the epoch's batch mixing (set by the stages feature)
    erasing: RandomErasing | None = None   # --random-erasing, before the mixing
    clip_grad: float | None = None   # --clip-grad: the largest global gradient norm of an optimizer step
