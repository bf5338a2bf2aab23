"""The `pytorch` backend: torchvision transforms on PIL images in DataLoader workers, uint8 batches.

Augmentation randomness is seeded per sample from (seed, epoch, dataset index), so a batch's pixels do
not depend on the number of workers, on which worker made it, or on where an epoch was resumed: a
resumed epoch is exact with no state beyond the Loader's own. The loader never draws from the process's
global torch, numpy or python generators (the training loop's dropout and mixup draws are its own), and
its worker processes ignore SIGTERM and SIGINT: a scheduler signals the whole process group, and the
main process, which owns the stop, must outlive its workers long enough to save a checkpoint.
"""
from __future__ import annotations

import atexit
import functools
import io
import random
import signal
import sys
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ..cli import UserError
from ..context import ExecutionContext
from .augmentations import POLICIES
from .autoaugment import PolicyV0
from .folder import DROPPED, DataError, ImageFolderIndex, UnreadableSample, epoch_samples, epoch_seed, shard_size
from .loader import MAGNITUDE_BINS, MEAN, STD, Batch, Loader, Triple, device_batches, val_resize_size

if TYPE_CHECKING:
    from . import LoaderOptions

# --interpolation -> torchvision mode. On PIL images torchvision resizes with Pillow, whose BILINEAR
# filter is already a triangle filter widened when downscaling (antialiased), i.e. DALI's "triangular";
# so "bilinear" and "triangular" are the same filter on this backend and differ only under DALI.
INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "triangular": InterpolationMode.BILINEAR,
}

# Gray fill for pixels that torchvision's policies move in from outside (as DALI's auto_aug and the reference's
# AutoAugment fill).
FILL = [128, 128, 128]

# (path that failed, why, what became of its sample)
BadRecord = tuple[str, str, str]

# Pillow opens 16-bit grayscale PNG/TIFF as I;16 (or as 32-bit I), whose convert("RGB") clips every value
# above 255 to white.
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def interpolation_mode(name: str) -> InterpolationMode:
    """The torchvision mode for an --interpolation value."""
    if name not in INTERPOLATIONS:
        raise UserError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


def augmentation_policy(augmentation: str | None, magnitude: int, interpolation: InterpolationMode
                        ) -> list[Callable]:
    """The --augmentation transform (empty for None)."""
    if augmentation is None:
        return []
    return POLICIES.get(augmentation).implementation(augmentation, "pytorch")(magnitude, interpolation)


# --augmentation's transforms on this backend (entries of augmentations.POLICIES).

def autoaugment(magnitude: int, interpolation: InterpolationMode) -> list[Callable]:
    return [PolicyV0()]  # the reference's policy, with its own filters whatever --interpolation says


def autoaugment_paper(magnitude: int, interpolation: InterpolationMode) -> list[Callable]:
    return [T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=interpolation, fill=FILL)]


def randaugment(magnitude: int, interpolation: InterpolationMode) -> list[Callable]:
    return [T.RandAugment(num_ops=2, magnitude=magnitude, num_magnitude_bins=MAGNITUDE_BINS,
                          interpolation=interpolation, fill=FILL)]


def trivialaugment(magnitude: int, interpolation: InterpolationMode) -> list[Callable]:
    return [T.TrivialAugmentWide(num_magnitude_bins=MAGNITUDE_BINS, interpolation=interpolation, fill=FILL)]


def train_transform(image_size: int, interpolation: str = "bilinear", augmentation: str | None = None,
                    magnitude: int = 9) -> T.Compose:
    """PIL image -> uint8 [3,S,S]: random-resized crop, horizontal flip, then the augmentation policy."""
    mode = interpolation_mode(interpolation)
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=mode, antialias=True),
        T.RandomHorizontalFlip(),
        *augmentation_policy(augmentation, magnitude, mode),
        T.PILToTensor(),
    ])


def val_transform(image_size: int, interpolation: str = "bilinear", crop_pct: float | None = None) -> T.Compose:
    """PIL image -> uint8 [3,S,S]: short side to S+32 (the reference's evaluation geometry), or to round(S/crop_pct),
    then centre crop S."""
    mode = interpolation_mode(interpolation)
    return T.Compose([
        T.Resize(val_resize_size(image_size, crop_pct), interpolation=mode, antialias=True),
        T.CenterCrop(image_size),
        T.PILToTensor(),
    ])


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully as RGB (grayscale, palette, CMYK, 16-bit are converted).

    Pillow refuses decompression bombs (more than 2 x Image.MAX_IMAGE_PIXELS) with DecompressionBombError.
    """
    with open(path, "rb") as f:
        return _rgb(Image.open(f))


def decode_rgb(data: bytes) -> Image.Image:
    """`load_rgb` of an image file's bytes (a shard member's, say)."""
    return _rgb(Image.open(io.BytesIO(data)))


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        image = to_8bit(image)
    return image.convert("RGB")  # convert() reads all pixel data, so truncation fails here


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit "L": round(v / 257), the scaling DALI's decoder applies.

    Mode I (32 bits) is taken to hold 16-bit values, as it does when Pillow reads 16-bit files; values
    outside 0..65535 are clipped. (Pillow reads 16-bit colour PNGs as RGB itself, keeping the high byte,
    v >> 8, which differs from round(v / 257) by at most 1.)
    """
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    # round(v / 257) without floats: v / 257 is never exactly half way, 257 being odd.
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


class FolderDataset(Dataset):
    """Samples of an ImageFolderIndex (or a webdataset.ShardIndex), addressed by (epoch, index) keys.

    Returns (uint8 image or None, label, bad records). With `replace` (training) an undecodable file is
    replaced by the next readable file in dataset order (with that file's label), so batches stay full and
    epochs keep their length; without it (validation) its image is None and `collate` drops it. The
    records travel with the batch so that the main process can warn once and count; they are non-empty
    exactly when the sample's own file was unreadable.
    """

    def __init__(self, index: ImageFolderIndex, transform: Callable, seed: int, replace: bool = True) -> None:
        self.samples = index.samples
        self.read = index.read
        self.transform = transform
        self.seed = seed
        self.replace = replace

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, ...]) -> tuple[torch.Tensor | None, int, list[BadRecord]]:
        # (epoch, index), or (epoch, index, repeat) for the repeats after the first of --repeated-augment
        epoch, index, *repeat = key
        failures: list[tuple[str, str]] = []
        for attempt in range(len(self.samples) if self.replace else 1):
            position = (index + attempt) % len(self.samples)
            path, label = self.samples[position]
            try:
                image = decode_rgb(self.read(position))
            except UnreadableSample as err:
                failures.append((path, str(err)))
                continue
            except Exception as err:  # noqa: BLE001 - any decoder failure of one file must not end the run
                failures.append((path, f"{type(err).__name__}: {err}"))
                continue
            bad = [(failed, reason, f"replaced by {path}") for failed, reason in failures]
            return self._augment(image, epoch, index, *repeat), label, bad
        if not self.replace:
            return None, label, [(path, reason, DROPPED) for path, reason in failures]
        raise DataError(f"none of the {len(self.samples)} images could be decoded (first: {failures[0][0]})")

    def _augment(self, image: Image.Image, epoch: int, index: int, *repeat: int) -> torch.Tensor:
        # The random draws of the transforms depend on (seed, epoch, index[, repeat]) only. torchvision's
        # transforms draw from the CPU default generator, the reference's AutoAugment (autoaugment.PolicyV0) from
        # Python's `random`: both are seeded here and restored after, so that the process's own draws (dropout,
        # mixup when workers=0) are untouched. torch.manual_seed would do the same and seed every accelerator
        # backend besides: 0.4 ms a call, 40 % of the time of a 64 px sample.
        generator = torch.default_generator
        state, python_state = generator.get_state(), random.getstate()
        seed = epoch_seed(self.seed, epoch, index, *repeat)
        generator.manual_seed(seed)
        random.seed(seed)
        try:
            return self.transform(image)
        finally:
            generator.set_state(state)
            random.setstate(python_state)


class EpochShardSampler(Sampler):
    """Yields the (epoch, dataset index) keys of this rank's shard for the selected epoch, from a skip offset; under
    --repeated-augment (training) a repeat after the first is (epoch, index, repeat), augmented by a seed of its own."""

    def __init__(self, index: ImageFolderIndex, *, seed: int, rank: int, world_size: int, train: bool,
                 repeats: int = 1) -> None:
        self.index, self.num_items = index, len(index.samples)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.train, self.repeats = train, repeats
        self.epoch = 0
        self.skip_items = 0

    def select(self, epoch: int, skip_items: int) -> None:
        self.epoch, self.skip_items = epoch, skip_items

    def _samples(self) -> list[tuple[int, int]]:
        return epoch_samples(self.index, epoch=self.epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
                             train=self.train, repeats=self.repeats)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return ((self.epoch, index, repeat) if repeat else (self.epoch, index)
                for index, repeat in self._samples()[self.skip_items:])

    def __len__(self) -> int:
        size = shard_size(self.num_items, rank=self.rank, world_size=self.world_size, equal_shards=self.train)
        return max(size - self.skip_items, 0)


def collate(samples: list[tuple[torch.Tensor | None, int, list[BadRecord]]]
            ) -> tuple[torch.Tensor, torch.Tensor, list[BadRecord], int]:
    """Stack the uint8 images (no float conversion in the workers) and int64 labels of the samples that have
    an image; the bad records as one list; how many samples' own files were unreadable."""
    kept = [(image, label) for image, label, _ in samples if image is not None]
    # A validation batch whose every file was dropped: an empty batch, which Loader counts but does not yield.
    images = torch.stack([image for image, _ in kept]) if kept else torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    labels = torch.tensor([label for _, label in kept], dtype=torch.int64)
    bad = [record for _, _, records in samples for record in records]
    return images, labels, bad, sum(1 for _, _, records in samples if records)


def _init_worker(base_seed: int, worker_id: int) -> None:
    # A scheduler's SIGTERM (or a terminal's SIGINT) reaches the whole process group; the main process stops
    # the run and then shuts the workers down through their queues (close() kills any that do not exit).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The reference's worker seeds (seed + rank + worker id), for anything outside our per-sample seeding.
    seed = base_seed + worker_id
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Loaders with worker processes, closed at interpreter exit before multiprocessing's own exit handler runs
# (atexit is last-in first-out, and torch registered that one when it was imported): that handler joins every
# child after a terminate(), whose SIGTERM our workers ignore, so a process leaving with a live DataLoader
# iterator (an exception's traceback keeps the loader alive) would wait for its workers forever.
_LOADERS_WITH_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_loaders_at_exit() -> None:
    for loader in list(_LOADERS_WITH_WORKERS):
        loader.close()


# Modules a forkserver imports once, before it forks any worker: what unpickling a worker's dataset needs.
FORKSERVER_PRELOAD = ["image_classification.data.pytorch_backend"]


def holds_dali_pipelines() -> bool:
    """Whether this process holds DALI pipelines that have not been shut down (in use, or garbage not yet
    collected); their executor threads do not survive a fork."""
    pipeline = sys.modules.get("nvidia.dali.pipeline")
    if pipeline is None:
        return False
    refs = getattr(pipeline.Pipeline, "_pipes", None)  # DALI's registry of live pipelines (for its atexit)
    if refs is None:
        return True  # a DALI without that registry: assume the worst
    return any(ref() is not None for ref in list(refs))


def worker_start_method() -> str:
    """How DataLoader workers start: "fork" (the reference's, 0.05-0.07 s for 2 workers here), or "forkserver"
    while this process holds DALI pipelines.

    A forked worker inherits every object of its parent but none of its threads. When the garbage collector
    runs in the worker and finalizes an inherited DALI pipeline, the pipeline's executor waits for threads that
    do not exist in the worker, forever. A forkserver is a fresh interpreter started with exec (3.7 s here
    the first time, importing FORKSERVER_PRELOAD; 0.06 s per loader after that); spawn would cost 3-4 s for
    every loader. Our DALI loaders shut their pipelines down when they are done with them, so fork stays the
    rule; pipelines someone keeps or drops without closing them make it forkserver.
    """
    return "forkserver" if holds_dali_pipelines() else "fork"


def _worker_context(method: str):
    context = torch.multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return context


class PytorchLoader(Loader):
    """torch DataLoader over a FolderDataset with a per-epoch shard sampler; normalises on the device."""

    def __init__(self, index: ImageFolderIndex, transform: Callable, *, train: bool, batch_size: int,
                 ctx: ExecutionContext, workers: int, prefetch: int, seed: int, repeats: int = 1,
                 mean: Triple = MEAN, std: Triple = STD) -> None:
        self.sampler = EpochShardSampler(index, seed=seed, rank=ctx.rank, world_size=ctx.world_size, train=train,
                                         repeats=repeats)
        super().__init__(classes=index.classes, batch_size=batch_size, drop_last=train, ctx=ctx,
                         num_samples=shard_size(len(index.samples), rank=ctx.rank, world_size=ctx.world_size,
                                                equal_shards=train), mean=mean, std=std)
        self.dataset = FolderDataset(index, transform, seed, replace=train)
        worker_options = {}
        if workers > 0:
            worker_options = dict(prefetch_factor=max(prefetch, 1), persistent_workers=True,
                                  worker_init_fn=functools.partial(_init_worker, seed + ctx.rank))
        # Each new DataLoader iterator draws its workers' base seed from `generator`; the default would be the
        # global torch generator, and a resumed run, which creates its iterator after restoring that
        # generator's state, would then shift every later dropout draw.
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=train,
                                 num_workers=workers, collate_fn=collate, pin_memory=ctx.pin_memory(),
                                 generator=torch.Generator().manual_seed(seed + ctx.rank), **worker_options)
        if workers > 0:
            _LOADERS_WITH_WORKERS.add(self)

    def close(self) -> None:
        """Stop the persistent workers now (a progressive run replaces its train loader at every stage)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            workers = list(getattr(iterator, "_workers", []))
            # What DataLoader does when it is garbage-collected; torch has no public call for it.
            iterator._shutdown_workers()
            self.loader._iterator = None
            for worker in workers:
                # torch's fallback, terminate(), sends the SIGTERM our workers ignore.
                if worker.is_alive():
                    worker.kill()
                    worker.join()

    def _iterate(self, epoch: int, skip_batches: int) -> Iterator[tuple[Batch, int]]:
        self.sampler.select(epoch, skip_batches * self.batch_size)
        unreadable: deque[int] = deque()  # per host batch, until the device batch made from it is handed out
        for batch in device_batches(self._host_batches(unreadable), self.ctx, self.mean, self.std):
            yield batch, unreadable.popleft()

    def _host_batches(self, unreadable: deque[int]) -> Iterator[Batch]:
        if self.loader.num_workers > 0 and getattr(self.loader, "_iterator", None) is None:
            # The persistent workers start with this iteration: decide how, for the process as it is now.
            self.loader.multiprocessing_context = _worker_context(worker_start_method())
        for images, labels, bad, count in self.loader:
            for path, reason, outcome in bad:
                self._bad.add(path, reason, outcome)
            unreadable.append(count)
            yield images, labels


def build_loader(index: ImageFolderIndex, options: LoaderOptions) -> PytorchLoader:
    """The `pytorch` entry of DATA_BACKENDS: training or validation transforms in a PytorchLoader."""
    transform = (train_transform(options.image_size, options.interpolation, options.augmentation, options.magnitude)
                 if options.train else val_transform(options.image_size, options.interpolation, options.crop_pct))
    return PytorchLoader(index, transform, train=options.train, batch_size=options.batch_size, ctx=options.ctx,
                         workers=options.workers, prefetch=options.prefetch, seed=options.seed,
                         repeats=options.repeats, mean=options.mean, std=options.std)
