"""Mixup as the reference does it: one λ ~ Beta(α, α) per batch and a random pairing of its samples."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def one_hot(target: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return F.one_hot(target, num_classes).to(dtype)


@torch.no_grad()
def mix(images: torch.Tensor, soft_target: torch.Tensor, lam: float, perm: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """λ·x + (1-λ)·x[perm] for the images and the soft targets."""
    return lam * images + (1.0 - lam) * images[perm], lam * soft_target + (1.0 - lam) * soft_target[perm]


class Mixup:
    """Mixes each training batch; λ comes from numpy's global RNG and the pairing from torch's (both seeded).

    Draws happen on the host, so a batch costs no device sync.
    """

    def __init__(self, alpha: float, num_classes: int):
        if alpha <= 0:
            raise ValueError(f"--mixup alpha must be positive, got {alpha}")
        self.alpha = alpha
        self.num_classes = num_classes

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = float(np.random.beta(self.alpha, self.alpha))
        perm = torch.randperm(images.shape[0]).to(images.device, non_blocking=True)
        return mix(images, one_hot(target, self.num_classes), lam, perm)
