"""Test-time augmentation (--tta flip in main.py's validation and in classify.py).

flip: the model sees the image and its horizontal mirror; the prediction is the mean of the two softmax
distributions (probabilities, not logits, are averaged). The wrapped model returns the log of that mean, which
cross-entropy, top-k and softmax read as they read logits: softmax(log p) = p, and the validation loss is the
negative log of the averaged probability of the true class.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cli import UserError

TTA_MODES = ("none", "flip")


class FlipTTA(nn.Module):
    """log(mean(softmax(model(x)), softmax(model(mirrored x)))), in float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        plain = F.log_softmax(self.model(images).float(), dim=1)
        mirrored = F.log_softmax(self.model(images.flip(-1)).float(), dim=1)
        # log((p + q) / 2) from log p and log q without leaving log space (no underflow to log 0).
        return torch.logaddexp(plain, mirrored) - math.log(2.0)


def with_tta(model: nn.Module, mode: str) -> nn.Module:
    """`model` as --tta `mode` evaluates it (itself for none)."""
    if mode == "none":
        return model
    if mode == "flip":
        return FlipTTA(model)
    raise UserError(f"--tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")
