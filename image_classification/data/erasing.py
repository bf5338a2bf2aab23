"""--random-erasing: torchvision's RandomErasing (Zhong et al. 2017) on each image of a training batch.

torchvision and timm erase after normalisation, with a value of 0: the rectangle becomes the dataset's mean colour
in pixel terms, exactly 0 in what the model sees. Our batches stay uint8 until the device normalises them (in DALI's
pipeline or the loader's prefetcher), so erasing in the data workers could only write a rounded mean; it happens in
the training step instead, on the normalised batch, one image at a time with torchvision's draws: the
same draws (probability P, then area 2-33 % and aspect 0.3-3.3 by up to 10 attempts) and the same zeros, on every
backend. Its random numbers come from torch's CPU generator, as mixup's do, whose state checkpoints keep for an
exact resume.
"""
from __future__ import annotations

import torch
from torchvision import transforms as T

SCALE = (0.02, 0.33)
RATIO = (0.3, 3.3)


class RandomErasing:
    """Erase a random rectangle of each image of a normalised [B, C, H, W] batch with probability `p`, in place."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        for image in images:  # one draw per image, as the transform in a dataset makes
            # torchvision's RandomErasing(p, SCALE, RATIO, value=0).forward, but for its fill: a CPU tensor of the
            # value copied into the rectangle would wait for a GPU once per erased image; zero_ does not.
            if torch.rand(1) < self.p:
                i, j, h, w, _ = T.RandomErasing.get_params(image, scale=SCALE, ratio=RATIO, value=[0.0])
                if h < height:  # otherwise no rectangle fitted in 10 attempts, and the image stays as it is
                    image[..., i:i + h, j:j + w].zero_()
        return images
