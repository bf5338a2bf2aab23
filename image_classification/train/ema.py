"""Exponential moving average of the weights (--use-ema), validated as val_ema.

After every training iteration: shadow = μ'·shadow + (1-μ')·weights with μ' = min(μ, (1+step)/(10+step)),
over parameters and buffers except BatchNorm's num_batches_tracked, where step is the run's iteration
(epoch × iterations per epoch + iteration, from 0): the reference's rule. With gradient accumulation the
weights change only every few iterations, and the shadow moves towards them at each one, as the reference's.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..checkpoint import EMA_KEY
from ..cli import UserError
from ..config import Config
from ..features import Step, TrainingFeature
from ..metrics import VAL_METRICS
from ..models.weights import fit_state_dict


def ema_decay(mu: float, step: int) -> float:
    """The reference's warm-started decay: small early, μ after a few dozen steps."""
    return min(mu, (1.0 + step) / (10.0 + step))


class EMA(TrainingFeature):
    """The training feature of --use-ema: a shadow copy of the model whose floating state follows the model's by
    EMA after every iteration, validated as val_ema and kept in checkpoints as state_dict_ema (the reference's)."""

    checkpoint_key = EMA_KEY  # the reference's key

    def __init__(self, model: nn.Module, mu: float):
        if not 0.0 < mu < 1.0:
            raise UserError(f"--use-ema decay must be in (0, 1), got {mu}")
        self.mu = mu
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._names = [name for name, t in self.module.state_dict().items()
                       if not name.endswith("num_batches_tracked") and t.is_floating_point()]

    @classmethod
    def metrics(cls, config: Config) -> dict[str, dict[str, int]]:
        return {"val_ema": VAL_METRICS} if config.ema.use_ema is not None else {}

    @classmethod
    def from_config(cls, config: Config, job) -> "EMA | None":
        return None if config.ema.use_ema is None else cls(job.trainer.model, config.ema.use_ema)

    def after_step(self, job, step: Step) -> None:
        # Every iteration, counted over the run, as the reference.
        self.update(job.trainer.model, step.epoch * len(job.train_loader) + step.iteration)

    def models_to_validate(self) -> list[tuple[str, nn.Module]]:
        return [("val_ema", self.module)]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the shadow towards `model` (the unwrapped model, not DDP)."""
        decay = ema_decay(self.mu, step)
        source = model.state_dict()
        shadow = self.module.state_dict()
        torch._foreach_lerp_([shadow[n] for n in self._names], [source[n].detach() for n in self._names],
                             1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict | None, checkpoint, source: str) -> None:
        """The checkpoint's EMA weights, or its weights for a checkpoint trained without EMA."""
        self.module.load_state_dict(fit_state_dict(self.module, state or checkpoint.state_dict,
                                                   source=f"{source} (EMA)", resuming=True))
