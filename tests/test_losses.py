"""Training losses (train/losses.py) and mixup's soft targets."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from image_classification.data.mixup import mix
from image_classification.train.losses import (
    LabelSmoothing,
    SoftTargetCrossEntropy,
    build_loss,
)

ROOT = Path(__file__).resolve().parents[1]


def test_label_smoothing_and_mixup_soft_target_loss_on_known_tensors():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    target = torch.tensor([0, 2])
    logp = F.log_softmax(logits, dim=1)
    s = 0.1
    smooth = LabelSmoothing(s).train()
    smoothed = ((1 - s) * -logp[[0, 1], [0, 2]] + s * -logp.mean(1)).mean()
    torch.testing.assert_close(smooth(logits, target), smoothed)

    lam, perm = 0.7, torch.tensor([1, 0])
    images = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mixed, soft = mix(images, F.one_hot(target, 3).float(), lam, perm)
    torch.testing.assert_close(mixed, torch.tensor([[1.6, 2.6], [2.4, 3.4]]))
    torch.testing.assert_close(soft, torch.tensor([[0.7, 0.0, 0.3], [0.3, 0.0, 0.7]]))
    loss = SoftTargetCrossEntropy(s).train()
    expected = ((1 - s) * -(logp * soft).sum(1) + s * -logp.mean(1)).mean()
    torch.testing.assert_close(loss(logits, soft), expected)
    # In eval, as the reference validates: the mixup loss and plain cross-entropy are cross-entropy on labels,
    # label smoothing stays.
    for criterion in (loss, build_loss(0.0, 0.0)):
        torch.testing.assert_close(criterion.eval()(logits, target), F.cross_entropy(logits, target))
    torch.testing.assert_close(smooth.eval()(logits, target), smoothed)
    assert isinstance(build_loss(0.1, 0.2), SoftTargetCrossEntropy)
