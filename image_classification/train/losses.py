"""Training losses of the reference: cross-entropy, label smoothing, and the soft-target NLL used with mixup/CutMix.

The reference validates with its training criterion in eval mode: label smoothing stays in val.loss, while the
mixup loss is plain cross-entropy on the integer labels there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LabelSmoothing(nn.Module):
    """(1-s)·NLL(target) + s·mean(-log p) over classes, for integer targets, in training and evaluation."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logprobs = F.log_softmax(logits.float(), dim=-1)
        nll = -logprobs.gather(-1, target.unsqueeze(1)).squeeze(1)
        smooth = -logprobs.mean(dim=-1)
        return ((1.0 - self.smoothing) * nll + self.smoothing * smooth).mean()


class SoftTargetCrossEntropy(nn.Module):
    """NLL against soft (e.g. mixed one-hot) targets, with label smoothing: the reference's NLLMultiLabelSmooth."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.cross_entropy(logits, target)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        nll = -(logprobs * target.float()).sum(dim=-1)
        smooth = -logprobs.mean(dim=-1)
        return ((1.0 - self.smoothing) * nll + self.smoothing * smooth).mean()


def build_loss(label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0) -> nn.Module:
    """The loss the reference picks for these flags (soft targets whenever batches are mixed)."""
    if mixup > 0.0 or cutmix > 0.0:
        return SoftTargetCrossEntropy(label_smoothing)
    if label_smoothing > 0.0:
        return LabelSmoothing(label_smoothing)
    return nn.CrossEntropyLoss()


class TrainingLoss:
    """What a training step minimises: `criterion` on the (mixed) batch's logits, plus the terms a feature adds.

    `terms` names the extra train.* metrics, whose values of the last call `last_terms` returns (a distillation
    loss reports its kd_loss); `criterion` alone, in eval mode, is what validation reports as val.loss.
    """

    terms: tuple[str, ...] = ()

    def __init__(self, criterion: nn.Module) -> None:
        self.criterion = criterion

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits, target)

    def last_terms(self) -> list[torch.Tensor]:
        """The values of `terms` in the last call, detached."""
        return []
