"""What every backend's loader shares: epoch/skip bookkeeping, resume state, unreadable-file counts,
on-device normalisation, GPU prefetching."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator

import torch

from ..cli import UserError
from ..context import ExecutionContext
from ..preprocessing import IMAGENET_MEAN as MEAN
from ..preprocessing import IMAGENET_STD as STD
from ..preprocessing import Triple
from .folder import BadFiles

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]

# RandAugment/TrivialAugment magnitude bins on every backend (torchvision's and DALI's default): magnitudes
# run from 0 (identity) to MAGNITUDE_BINS - 1 (each operation's largest change).
MAGNITUDE_BINS = 31


def val_resize_size(image_size: int, crop_pct: float | None = None) -> int:
    """The short side that validation resizes to before its centre crop of `image_size`: round(S / crop_pct), or
    the reference's S + 32 without --eval-crop-pct."""
    if crop_pct is None:
        return image_size + 32
    if not 0.0 < crop_pct <= 1.0:
        raise UserError(f"--eval-crop-pct must be in (0, 1], got {crop_pct}")
    return round(image_size / crop_pct)


class Loader:
    """An epoch of (images, labels) batches on ctx.device; call `set_epoch` before each epoch.

    images: float32 [B, 3, S, S], normalised, in ctx.memory_format; labels: int64 [B].
    `len(loader)` counts the whole epoch's batches for this rank, also when `skip_batches` starts later.

    Unreadable images (undecodable, empty, decompression bombs) are warned about once each, naming the
    file. Training replaces one by the next readable image in dataset order (with its label), so its
    batches stay full; validation drops it, so a batch comes out shorter (one with no readable image at
    all is not yielded) and every readable image is scored exactly once. `epoch_bad_files` counts them.

    Exact mid-epoch resume: after the consumer has taken batch i, `state_dict()` holds what a new process
    needs beyond (epoch, i + 1); it calls `load_state_dict(state)` on a loader built with the same
    arguments, then `set_epoch(epoch, skip_batches=i + 1)`, and gets the batches the uninterrupted run
    would have had from batch i + 1 on.

    `mean` and `std` (0..255 scale) normalise the images: ImageNet's, or the model's own (EfficientNet-Lite).
    """

    def __init__(self, *, classes: list[str], batch_size: int, num_samples: int, drop_last: bool,
                 ctx: ExecutionContext, mean: Triple = MEAN, std: Triple = STD) -> None:
        self.classes = list(classes)
        self.mean, self.std = mean, std
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.drop_last = drop_last
        self.ctx = ctx
        self.epoch = 0
        self.skip_batches = 0
        self._bad = BadFiles()
        self._next_batch = 0  # the batch after the last one handed out
        self._epoch_bad = 0  # unreadable samples of this epoch's batches handed out so far
        self._epoch_bad_before = 0  # ... of the batches before skip_batches (known after a resume)
        self._restored: dict | None = None  # load_state_dict's state, until set_epoch
        self._resumed: dict | None = None  # that state, when set_epoch selected the position it was taken at

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
        self._next_batch = skip_batches
        state, self._restored = self._restored, None
        self._resumed = None
        if state is not None and (state["epoch"], state["next_batch"]) == (epoch, skip_batches):
            self._resumed = state
        elif state is not None and state["next_batch"] < len(self):
            log.warning("the data loader state was saved at epoch %d batch %d but iteration resumes at epoch %d "
                        "batch %d: the batches may differ from an uninterrupted run's", state["epoch"],
                        state["next_batch"], epoch, skip_batches)
        self._epoch_bad_before = self._resumed["epoch_bad_files"] if self._resumed else 0
        self._epoch_bad = self._epoch_bad_before

    def __iter__(self) -> Iterator[Batch]:
        self._next_batch = self.skip_batches
        self._epoch_bad = self._epoch_bad_before
        return self._hand_out(self._iterate(self.epoch, self.skip_batches))

    def _hand_out(self, batches: Iterator[tuple[Batch, int]]) -> Iterator[Batch]:
        for batch, unreadable in batches:
            # Counted before the yield: a consumer that stops after this batch never resumes this generator,
            # and state_dict() must already include the batch.
            self._next_batch += 1
            self._epoch_bad += unreadable
            if len(batch[1]):
                yield batch

    def _iterate(self, epoch: int, skip_batches: int) -> Iterator[tuple[Batch, int]]:
        """(batch, how many of its samples were unreadable) from batch `skip_batches` on, in order.

        A validation batch whose samples were all unreadable comes as an empty batch (0 labels); it is
        counted but not handed out.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _iterate")

    def close(self) -> None:
        """Release worker processes or pipelines now rather than at garbage collection (no-op by default)."""

    @property
    def bad_files(self) -> list[str]:
        """Paths found unreadable so far, in every epoch (each was warned about once)."""
        return self._bad.paths()

    @property
    def epoch_bad_files(self) -> int:
        """Unreadable samples in the selected epoch's batches handed out so far on this rank (reset by set_epoch).

        Each such sample was replaced (training) or dropped (validation). After a resume the batches before
        `skip_batches` count too, so the total matches the uninterrupted run's.
        """
        return self._epoch_bad

    def state_dict(self) -> dict:
        """What resuming after the last batch handed out needs besides (epoch, skip_batches).

        Plain values only (str, int, bytes, dicts), so `torch.load(weights_only=True)` reads it back: the
        position, the epoch's unreadable count so far, and the files found unreadable (so that a resumed
        run neither warns about them again nor treats them differently). Backends add their own entries.
        """
        return {"epoch": self.epoch, "next_batch": self._next_batch, "epoch_bad_files": self._epoch_bad,
                "bad_files": self._bad.reasons()}

    def load_state_dict(self, state: dict) -> None:
        """Take `state_dict()` of a loader built with the same arguments; the next `set_epoch` at its position
        (epoch, next_batch) then continues that loader's epoch exactly."""
        missing = [key for key in ("epoch", "next_batch", "epoch_bad_files", "bad_files") if key not in state]
        if missing:
            raise UserError(f"data loader state lacks {', '.join(missing)}: not a Loader.state_dict()")
        self._bad.restore(state["bad_files"])
        self._restored = dict(state)


class Normalizer:
    """uint8 [B,3,H,W] on the device -> float32, (x - mean) / std (ImageNet's by default), in the run's memory
    format."""

    def __init__(self, ctx: ExecutionContext, mean: Triple = MEAN, std: Triple = STD) -> None:
        self.memory_format = ctx.memory_format
        mean = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        # x * (1/std) - mean/std: one multiply and one add, about twice as fast as subtract-then-divide on CPU.
        self.scale = (1 / std).float().to(ctx.device)
        self.shift = (-mean / std).float().to(ctx.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Converting the layout while still uint8 moves a quarter of the bytes a float conversion would.
        images = images.contiguous(memory_format=self.memory_format)
        return images.float().mul_(self.scale).add_(self.shift)


def device_batches(host_batches: Iterable[Batch], ctx: ExecutionContext, mean: Triple = MEAN, std: Triple = STD
                   ) -> Iterator[Batch]:
    """Move uint8 host batches to the device and normalise them there (prefetched on a side stream on GPU)."""
    normalize = Normalizer(ctx, mean, std)
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
