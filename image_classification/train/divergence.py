"""Stop a run whose loss is no longer finite, before it writes NaN weights anywhere.

Nothing here waits for the device on its own. The loss is checked where the loop synchronises anyway (at
print frequency and at the end of an epoch), so a run stops at most --print-freq iterations after it
diverged, and no checkpoint is written in between (checkpoints follow the end-of-epoch check, and the
writer refuses non-finite weights besides). Under fp16 loss scaling a non-finite loss is the GradScaler's
business: it skips that step and halves its scale, which is how it finds its scale and normal. What is not
normal is a long run of skipped steps, which means the gradients are never finite again; the scaler's
step has synchronised already, so counting them costs nothing.
"""
from __future__ import annotations

import math

import torch

from ..cli import UserError
from ..config import Config
from ..features import Step, TrainingFeature

# Consecutive skipped fp16 steps that mean the run diverged: the scale is then 2^-100 of where it started,
# far past any finite gradient's need (finding the scale at the start of a run skips a handful).
MAX_SKIPPED_STEPS = 100


class DivergenceError(UserError):
    """The training loss became NaN or infinite; the message names where and the likely causes."""


class DivergenceGuard(TrainingFeature):
    """The training feature that watches the loss at the loop's synchronisation points, the weights at each epoch's
    end, and the GradScaler's skipped steps. On in every training run."""

    def __init__(self, scaler: torch.amp.GradScaler, causes: str) -> None:
        self.scaler = scaler
        self.causes = causes
        self.last_finite: tuple[float, str] | None = None   # (loss, where it was logged)
        self.skipped_steps = 0
        self._scale = scaler.get_scale() if scaler.is_enabled() else None

    @classmethod
    def from_config(cls, config: Config, job) -> "DivergenceGuard | None":
        return None if job.trainer.optimizer is None else cls(job.trainer.scaler, causes_for(config))

    def after_step(self, job, step: Step) -> None:
        if step.optimizer_step:
            self.after_optimizer_step(step.epoch, step.iteration + 1)
        if step.logged_loss is not None:
            self.check_loss(step.logged_loss, step.epoch, step.iteration + 1)

    def end_epoch(self, job, epoch: int, record: dict[str, float]) -> None:
        """The epoch's loss and the weights its last steps left, before validation and checkpoints see them."""
        iterations = job.config.runtime.prof if job.config.runtime.prof > 0 else len(job.train_loader)
        self.check_loss(record["train.loss"], epoch, min(iterations, len(job.train_loader)))
        self.check_weights(job.trainer.model, epoch, min(iterations, len(job.train_loader)))

    def load_state_dict(self, state: None, checkpoint, source: str) -> None:
        self.resumed(checkpoint.history)

    def check_loss(self, loss: float, epoch: int, iteration: int) -> None:
        """A loss the loop has synchronised for its log (iteration counted from 1): raise when not finite."""
        if math.isfinite(loss):
            self.last_finite = (loss, f"epoch {epoch}, iteration {iteration}")
        elif not self.scaler.is_enabled():
            self._fail(f"the training loss is {loss}", epoch, iteration)

    def check_weights(self, model: torch.nn.Module, epoch: int, iteration: int) -> None:
        """At the end of an epoch (one synchronisation for all tensors): raise when a step after the last logged
        loss left NaN or infinite weights, before validation and checkpoints see them."""
        tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        if bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            return
        bad = next(name for name, t in model.state_dict().items()
                   if t.is_floating_point() and not bool(torch.isfinite(t).all()))
        self._fail(f"the weights hold NaN or infinite values ({bad}) after its last step", epoch, iteration)

    def resumed(self, history: list[dict]) -> None:
        """A resumed run: the last finite loss so far is the last finished epoch's."""
        for epoch, record in reversed(list(enumerate(history))):
            loss = record.get("train.loss")
            if isinstance(loss, float) and math.isfinite(loss):
                self.last_finite = (loss, f"the end of epoch {epoch}")
                return

    def after_optimizer_step(self, epoch: int, iteration: int) -> None:
        """After the scaler's step and update: count skipped fp16 steps; raise after MAX_SKIPPED_STEPS in a row."""
        if not self.scaler.is_enabled():
            return
        scale = self.scaler.get_scale()
        # The scaler lowers its scale exactly when it skipped the step for non-finite gradients.
        self.skipped_steps = self.skipped_steps + 1 if scale < self._scale else 0
        self._scale = scale
        if self.skipped_steps >= MAX_SKIPPED_STEPS or scale == 0.0:  # a zero scale can only skip from then on
            self._fail(f"the fp16 gradients were not finite for {self.skipped_steps} steps in a row (loss scale "
                       f"now {scale:g})", epoch, iteration)

    def _fail(self, what: str, epoch: int, iteration: int):
        if self.last_finite is None:
            last = "no finite loss was logged before"
        else:
            loss, where = self.last_finite
            last = f"last finite loss {loss:.5f} at {where}"
        raise DivergenceError(f"training diverged at epoch {epoch}, iteration {iteration}: {what} ({last}); "
                              f"likely causes: {self.causes}. Stopped without writing a checkpoint; the workspace "
                              "keeps the last finite one")


def causes_for(config: Config) -> str:
    """The likely causes of a divergence in the run `config` describes, in its own flags' words."""
    causes = ["a learning rate too high for these weights (--lr, --warmup)"]
    if config.runtime.amp:
        causes.append("the fp16 loss scale (--static-loss-scale)")
    if config.quantization is not None:  # quant_main.py
        causes.append("quantizer ranges from calibration on too few or unrepresentative batches "
                      "(--calibration-batches, --calibrator)")
    return ", ".join(causes)
