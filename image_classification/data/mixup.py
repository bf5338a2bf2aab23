"""Batch mixing with soft targets: mixup as the reference does it, and CutMix beside it.

mixup: one λ ~ Beta(α, α) per batch and a random pairing of its samples; images and one-hot targets are
blended λ·x + (1-λ)·x[perm]. CutMix: λ ~ Beta(α, α) sets the area of one box per batch, which is pasted
from the paired samples; λ then becomes the share of each image that was kept, and the targets are
blended with it. With both on, each batch uses one of them, CutMix with probability `switch_prob`
(timm's rule). Targets always sum to 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..cli import UserError

# (top, bottom, left, right): rows top..bottom-1 and columns left..right-1
Box = tuple[int, int, int, int]


def one_hot(target: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return F.one_hot(target, num_classes).to(dtype)


@torch.no_grad()
def mix(images: torch.Tensor, soft_target: torch.Tensor, lam: float, perm: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """λ·x + (1-λ)·x[perm] for the images and the soft targets."""
    return lam * images + (1.0 - lam) * images[perm], lam * soft_target + (1.0 - lam) * soft_target[perm]


def cutmix_box(height: int, width: int, lam: float, rng: np.random.RandomState | None = None) -> Box:
    """A box covering about (1-λ) of the image (sides × √(1-λ)), centred uniformly at random, clipped to it."""
    rng = np.random if rng is None else rng  # numpy's global RNG by default, as mixup's λ
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    centre_y, centre_x = int(rng.randint(height)), int(rng.randint(width))
    top, left = centre_y - cut_h // 2, centre_x - cut_w // 2
    return (min(max(top, 0), height), min(max(top + cut_h, 0), height),
            min(max(left, 0), width), min(max(left + cut_w, 0), width))


def box_lambda(box: Box, height: int, width: int) -> float:
    """The share of the image outside `box` (what CutMix keeps of each sample)."""
    top, bottom, left, right = box
    return 1.0 - (bottom - top) * (right - left) / float(height * width)


@torch.no_grad()
def cut_and_paste(images: torch.Tensor, soft_target: torch.Tensor, box: Box, perm: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with `box` taken from x[perm]; targets blended by the area actually kept."""
    top, bottom, left, right = box
    mixed = images.clone()  # never in place: a loader may serve the same tensor again (synthetic)
    mixed[:, :, top:bottom, left:right] = images[perm, :, top:bottom, left:right]
    lam = box_lambda(box, images.shape[-2], images.shape[-1])
    return mixed, lam * soft_target + (1.0 - lam) * soft_target[perm]


class Mixup:
    """Mixes each training batch (mixup, CutMix, or either per batch); returns soft targets.

    λ, the mixup/CutMix choice and the box come from numpy's global RNG, the pairing from torch's (both
    seeded and checkpointed), so a batch costs no device sync. With both alphas 0 it only makes the
    targets one-hot (a progressive stage without mixing, under the soft-target loss of the others).
    """

    def __init__(self, alpha: float, num_classes: int, cutmix: float = 0.0, switch_prob: float = 0.5):
        for flag, value in (("--mixup", alpha), ("--cutmix", cutmix)):
            if value < 0:
                raise UserError(f"{flag} alpha must be >= 0 (0 disables), got {value}")
        if not 0.0 <= switch_prob <= 1.0:
            raise UserError(f"switch_prob must be in [0, 1], got {switch_prob}")
        self.alpha = alpha
        self.cutmix = cutmix
        self.num_classes = num_classes
        self.switch_prob = switch_prob

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        soft = one_hot(target, self.num_classes)
        if self.alpha <= 0 and self.cutmix <= 0:
            return images, soft
        use_cutmix = self.cutmix > 0 and (self.alpha <= 0 or np.random.rand() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.alpha
        lam = float(np.random.beta(alpha, alpha))
        perm = torch.randperm(images.shape[0]).to(images.device, non_blocking=True)
        if use_cutmix:
            return cut_and_paste(images, soft, cutmix_box(images.shape[-2], images.shape[-1], lam), perm)
        return mix(images, soft, lam, perm)
