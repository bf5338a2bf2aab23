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

from .cli import UserError


def ema_decay(mu: float, step: int) -> float:
    """The reference's warm-started decay: small early, μ after a few dozen steps."""
    return min(mu, (1.0 + step) / (10.0 + step))


class EMA:
    """A shadow copy of a model whose floating state follows the model's by EMA."""

    def __init__(self, model: nn.Module, mu: float):
        if not 0.0 < mu < 1.0:
            raise UserError(f"--use-ema decay must be in (0, 1), got {mu}")
        self.mu = mu
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._names = [name for name, t in self.module.state_dict().items()
                       if not name.endswith("num_batches_tracked") and t.is_floating_point()]

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

    def load_state_dict(self, state_dict) -> None:
        self.module.load_state_dict(state_dict)
