"""What every backend's loader shares: epoch/skip bookkeeping, on-device normalisation, GPU prefetching."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from ..context import ExecutionContext
from .folder import BadFiles

# ImageNet statistics on the 0..255 scale: batches stay uint8 until they reach the device.
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

Batch = tuple[torch.Tensor, torch.Tensor]

# RandAugment/TrivialAugment magnitude bins on every backend (torchvision's and DALI's default): magnitudes
# run from 0 (identity) to MAGNITUDE_BINS - 1 (each operation's largest change).
MAGNITUDE_BINS = 31


class Loader:
    """An epoch of (images, labels) batches on ctx.device; call `set_epoch` before each epoch.

    images: float32 [B, 3, S, S], normalised, in ctx.memory_format; labels: int64 [B].
    `len(loader)` counts the whole epoch's batches for this rank, also when `skip_batches` starts later.
    """

    def __init__(self, *, classes: list[str], batch_size: int, num_samples: int, drop_last: bool,
                 ctx: ExecutionContext) -> None:
        self.classes = list(classes)
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.drop_last = drop_last
        self.ctx = ctx
        self.epoch = 0
        self.skip_batches = 0
        self._bad = BadFiles()

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (its shuffle order) and start its iteration after `skip_batches` batches."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= skip_batches <= len(self):
            raise ValueError(f"skip_batches must be between 0 and {len(self)} (batches per epoch), got {skip_batches}")
        self.epoch = epoch
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[Batch]:
        return self._iterate(self.epoch, self.skip_batches)

    def _iterate(self, epoch: int, skip_batches: int) -> Iterator[Batch]:
        raise NotImplementedError(f"{type(self).__name__} must implement _iterate")

    def close(self) -> None:
        """Release worker processes or pipelines now rather than at garbage collection (no-op by default)."""

    @property
    def bad_files(self) -> list[str]:
        """Paths that could not be decoded so far (each was warned about and replaced by another image)."""
        return self._bad.paths()


class Normalizer:
    """uint8 [B,3,H,W] on the device -> float32, (x - mean) / std, in the run's memory format."""

    def __init__(self, ctx: ExecutionContext) -> None:
        self.memory_format = ctx.memory_format
        mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
        # x * (1/std) - mean/std: one multiply and one add, about twice as fast as subtract-then-divide on CPU.
        self.scale = (1 / std).float().to(ctx.device)
        self.shift = (-mean / std).float().to(ctx.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Converting the layout while still uint8 moves a quarter of the bytes a float conversion would.
        images = images.contiguous(memory_format=self.memory_format)
        return images.float().mul_(self.scale).add_(self.shift)


def device_batches(host_batches: Iterable[Batch], ctx: ExecutionContext) -> Iterator[Batch]:
    """Move uint8 host batches to the device and normalise them there (prefetched on a side stream on GPU)."""
    normalize = Normalizer(ctx)
    if ctx.is_cuda:
        yield from _cuda_prefetch(host_batches, ctx, normalize)
        return
    for images, labels in host_batches:
        yield normalize(ctx.to_device(images)), ctx.to_device(labels)


def _cuda_prefetch(host_batches: Iterable[Batch], ctx: ExecutionContext, normalize: Normalizer
                   ) -> Iterator[Batch]:
    """Copy and normalise batch i+1 on a side stream while the caller computes on batch i."""
    stream = torch.cuda.Stream(device=ctx.device)

    def load(batch: Batch) -> Batch:
        with torch.cuda.stream(stream):
            images = normalize(batch[0].to(ctx.device, non_blocking=True))
            labels = batch[1].to(ctx.device, non_blocking=True)
        return images, labels

    iterator = iter(host_batches)
    pending = None
    for batch in iterator:
        pending = load(batch)
        break
    while pending is not None:
        current = torch.cuda.current_stream(ctx.device)
        current.wait_stream(stream)
        for tensor in pending:
            # The tensors were allocated on the side stream but are used on the main one.
            tensor.record_stream(current)
        ready, pending = pending, None
        for batch in iterator:
            pending = load(batch)
            break
        yield ready
