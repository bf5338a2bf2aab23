"""The `synthetic` backend: one random batch, made once on the device, served every iteration.

It measures the model without any data loading, as the reference's synthetic loader does.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..context import ExecutionContext
from .loader import Batch, Loader

if TYPE_CHECKING:
    from . import LoaderOptions

# Enough iterations for stable throughput numbers, few enough for a CPU run to finish.
TRAIN_BATCHES = 100
VAL_BATCHES = 20


class SyntheticLoader(Loader):
    """`batches_per_epoch` copies of one fixed random batch (normal images, uniform labels)."""

    def __init__(self, *, image_size: int, batch_size: int, ctx: ExecutionContext, num_classes: int,
                 batches_per_epoch: int = TRAIN_BATCHES, seed: int | None = None) -> None:
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        super().__init__(classes=[str(i) for i in range(num_classes)], batch_size=batch_size,
                         num_samples=batches_per_epoch * batch_size, drop_last=True, ctx=ctx)
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        self.images = images.to(ctx.device).contiguous(memory_format=ctx.memory_format)
        self.labels = labels.to(ctx.device)

    def _iterate(self, epoch: int, skip_batches: int) -> Iterator[tuple[Batch, int]]:
        for _ in range(len(self) - skip_batches):
            yield (self.images, self.labels), 0  # no files, none unreadable


def build_loader(index: None, options: LoaderOptions) -> SyntheticLoader:
    """The `synthetic` entry of DATA_BACKENDS: TRAIN_BATCHES (training) or VAL_BATCHES of one random batch."""
    if options.train:
        return SyntheticLoader(image_size=options.image_size, batch_size=options.batch_size, ctx=options.ctx,
                               num_classes=options.num_classes, seed=options.seed)
    return SyntheticLoader(image_size=options.image_size, batch_size=options.batch_size, ctx=options.ctx,
                           num_classes=options.num_classes, batches_per_epoch=VAL_BATCHES, seed=options.seed + 1)
