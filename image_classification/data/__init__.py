"""Data pipelines: `build_train_loader` / `build_val_loader` for every --data-backend.

    train = build_train_loader("pytorch", "/imagenet", image_size=224, batch_size=256, ctx=ctx, seed=0)
    for epoch in range(epochs):
        train.set_epoch(epoch)                 # set_epoch(epoch, skip_batches=n) resumes mid-epoch
        for images, labels in train:           # float32 [B,3,S,S] normalised, int64 [B], on ctx.device
            ...

Backends (DATA_BACKENDS): pytorch (torchvision transforms in DataLoader workers), dali-cpu and dali-gpu (NVIDIA
DALI, CPU or nvJPEG decoding), synthetic (one random batch, no I/O). All file-based backends read
`<data>/train/<class>/**` and `<data>/val/<class>/**` by torchvision ImageFolder's rules (images at any
depth, symlinks followed, an empty class folder is an error), or (`data_format`, see shard_reader.py) the
WebDataset tar shards `python -m image_classification.data.shards` writes; they number the classes the same
way, shard by rank and order each epoch by (seed, epoch) identically; 16-bit grayscale images are scaled to
8 bits.
Unreadable images (corrupt, empty, decompression bombs) are warned about once, naming the file, and
counted per epoch in `loader.epoch_bad_files`: training replaces each by the next readable image (full
batches), validation leaves it out (a shorter batch; every readable image scored once). An unusable
folder raises DataError naming it. `loader.state_dict()` / `load_state_dict()` make a mid-epoch resume
give exactly the batches of the uninterrupted run (see Loader).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..cli import UserError
from ..config import DataConfig
from ..context import ExecutionContext
from ..registry import Registry
from .augmentations import POLICIES
from .folder import IMG_EXTENSIONS, DataError, ImageFolderIndex, dataset_classes
from .loader import MAGNITUDE_BINS, MEAN, STD, Loader, Triple

if TYPE_CHECKING:  # imported when used: shard_reader imports this package (DATA_FORMATS)
    from .shard_reader import ShardIndex

@dataclass(frozen=True)
class LoaderOptions:
    """What a data backend builds a loader from: build_train_loader's and build_val_loader's arguments."""

    train: bool
    image_size: int
    batch_size: int
    ctx: ExecutionContext
    num_classes: int
    workers: int
    prefetch: int
    interpolation: str
    augmentation: str | None
    magnitude: int
    seed: int
    crop_pct: float | None
    mean: Triple
    std: Triple
    repeats: int = 1  # --repeated-augment: each training image read this many times per epoch


@dataclass(frozen=True)
class Backend:
    """A --data-backend: where its loader comes from ("module:function" of (index, LoaderOptions) -> Loader,
    imported when used, since DALI and torchvision are heavy) and whether it reads the dataset at all."""

    loader: str
    reads_files: bool = True

    def build(self, index: ImageFolderIndex | ShardIndex | None, options: LoaderOptions) -> Loader:
        module, _, function = self.loader.partition(":")
        return getattr(importlib.import_module(module), function)(index, options)


DATA_BACKENDS: Registry[Backend] = Registry("data backend", flag="--data-backend")
DATA_BACKENDS.register("pytorch", Backend("image_classification.data.pytorch_backend:build_loader"))
DATA_BACKENDS.register("dali-cpu", Backend("image_classification.data.dali_backend:build_cpu_loader"))
DATA_BACKENDS.register("dali-gpu", Backend("image_classification.data.dali_backend:build_gpu_loader"))
DATA_BACKENDS.register("synthetic", Backend("image_classification.data.synthetic:build_loader", reads_files=False))

# --data-format: how a data folder holds the images; each scans one split into an index.
FORMATS: Registry[Callable[..., ImageFolderIndex | ShardIndex]] = Registry("dataset format", flag="--data-format")
FORMATS.register("folder", "image_classification.data.folder:scan_split")
FORMATS.register("shards", "image_classification.data.shard_reader:scan_shards")

# The flags' choices.
BACKENDS = DATA_BACKENDS.names()
FILE_BACKENDS = tuple(name for name in BACKENDS if DATA_BACKENDS.get(name).reads_files)  # those that read a dataset
AUGMENTATIONS = (None, *POLICIES.names())
INTERPOLATIONS = ("bilinear", "bicubic", "triangular")
DATA_FORMATS = ("auto", *FORMATS.names())

__all__ = ["AUGMENTATIONS", "BACKENDS", "DATA_BACKENDS", "DATA_FORMATS", "FILE_BACKENDS", "FORMATS", "IMG_EXTENSIONS", "INTERPOLATIONS",
           "MAGNITUDE_BINS", "MEAN", "STD", "DataError", "Loader", "LoaderOptions", "build_train_loader",
           "build_val_loader", "dataset_class_names", "dataset_classes", "scan_data", "train_loader_of", "val_loader_of"]


def _check_choices(backend: str, interpolation: str, augmentation: str | None = None) -> Backend:
    """The backend named, after refusing unknown choices in one line naming the flag."""
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if augmentation is not None:
        POLICIES.get(augmentation)
    return DATA_BACKENDS.get(backend)


def _check_sizes(image_size: int, batch_size: int, workers: int) -> None:
    if image_size < 1:
        raise UserError(f"--image-size must be positive, got {image_size}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")


def _resolve_seed(seed: int | None) -> int:
    # Without --seed the order is still a fixed function of one seed drawn here, for this loader's life.
    return int.from_bytes(os.urandom(4), "little") if seed is None else seed


def scan_data(data_dir: str | os.PathLike | None, split: str, num_classes: int, data_format: str = "auto"
              ) -> ImageFolderIndex | ShardIndex:
    """The index of one split: class folders (ImageFolderIndex) or tar shards (shard_reader.ShardIndex), as
    --data-format says or, with auto, as the data folder holds."""
    from .shard_reader import resolve_format
    if data_dir is None:
        raise DataError("no data folder given (DIR)")
    return FORMATS.get(resolve_format(data_dir, data_format))(data_dir, split, num_classes)


def dataset_class_names(data_dir: str | os.PathLike | None, data_format: str = "auto") -> list[str]:
    """The classes of a dataset in index order, without indexing its images: the class folders of both splits, or
    the shards' classes.txt (DataError when neither can be read)."""
    from .shard_reader import resolve_format, shard_classes
    if data_dir is None:
        raise DataError("no data folder given (DIR)")
    if resolve_format(data_dir, data_format) == "shards":
        return shard_classes(data_dir)
    return dataset_classes(data_dir)



def build_train_loader(backend: str, data_dir: str | None, *, image_size: int, batch_size: int,
                       ctx: ExecutionContext, num_classes: int = 1000, workers: int = 5, prefetch: int = 2,
                       interpolation: str = "bilinear", augmentation: str | None = None,
                       randaug_magnitude: int = 9, seed: int | None = None, data_format: str = "auto",
                       repeated_augment: int = 1, mean: Triple = MEAN, std: Triple = STD) -> Loader:
    """Training batches: random-resized crop, flip, optional augmentation policy; shuffled (each epoch's images read
    `repeated_augment` times each, folder.repeated_samples); last partial dropped; normalised by `mean`/`std`
    (0..255 scale: ImageNet's, or the model's own)."""
    kind = _check_choices(backend, interpolation, augmentation)
    _check_sizes(image_size, batch_size, workers)
    if not 0 <= randaug_magnitude < MAGNITUDE_BINS:
        raise UserError(f"--randaug-magnitude must be between 0 and {MAGNITUDE_BINS - 1}, got {randaug_magnitude}")
    options = LoaderOptions(train=True, image_size=image_size, batch_size=batch_size, ctx=ctx,
                            num_classes=num_classes, workers=workers, prefetch=prefetch, interpolation=interpolation,
                            augmentation=augmentation, magnitude=randaug_magnitude, seed=_resolve_seed(seed),
                            crop_pct=None, mean=mean, std=std, repeats=repeated_augment)
    if not kind.reads_files:
        if repeated_augment > 1:
            raise UserError("--repeated-augment repeats the images of a dataset; --data-backend synthetic has none")
        return kind.build(None, options)
    index = scan_data(data_dir, "train", num_classes, data_format)
    per_rank = len(index.samples) // ctx.world_size
    if per_rank < batch_size:
        raise DataError(f"{index.root} has {len(index.samples)} images: fewer than one batch of {batch_size} "
                        f"per process ({ctx.world_size} processes); lower --batch-size")
    return kind.build(index, options)


def build_val_loader(backend: str, data_dir: str | None, *, image_size: int, batch_size: int,
                     ctx: ExecutionContext, num_classes: int = 1000, workers: int = 5, prefetch: int = 2,
                     interpolation: str = "bilinear", seed: int | None = None, data_format: str = "auto",
                     crop_pct: float | None = None, mean: Triple = MEAN, std: Triple = STD) -> Loader:
    """Validation batches: short side to image_size+32 (or round(image_size/crop_pct)), centre crop; dataset
    order; every image once; normalised by `mean`/`std` (0..255 scale: ImageNet's, or the model's own)."""
    kind = _check_choices(backend, interpolation)
    _check_sizes(image_size, batch_size, workers)
    options = LoaderOptions(train=False, image_size=image_size, batch_size=batch_size, ctx=ctx,
                            num_classes=num_classes, workers=workers, prefetch=prefetch, interpolation=interpolation,
                            augmentation=None, magnitude=0, seed=_resolve_seed(seed), crop_pct=crop_pct, mean=mean,
                            std=std)
    index = scan_data(data_dir, "val", num_classes, data_format) if kind.reads_files else None
    return kind.build(index, options)


def train_loader_of(config: DataConfig, ctx: ExecutionContext, *, num_classes: int, seed: int, image_size: int,
                    randaug_magnitude: int, mean: Triple = MEAN, std: Triple = STD) -> Loader:
    """build_train_loader with a job's data flags, at a (progressive training stage's) size and magnitude."""
    return build_train_loader(config.data_backend, config.data, image_size=image_size, batch_size=config.batch_size,
                              ctx=ctx, num_classes=num_classes, workers=config.workers, prefetch=config.prefetch,
                              interpolation=config.interpolation, augmentation=config.augmentation,
                              randaug_magnitude=randaug_magnitude, seed=seed, data_format=config.data_format,
                              repeated_augment=config.repeated_augment, mean=mean, std=std)


def val_loader_of(config: DataConfig, ctx: ExecutionContext, *, num_classes: int, seed: int, image_size: int,
                  mean: Triple = MEAN, std: Triple = STD) -> Loader:
    """build_val_loader with a job's data flags, at `image_size`."""
    return build_val_loader(config.data_backend, config.data, image_size=image_size, batch_size=config.batch_size,
                            ctx=ctx, num_classes=num_classes, workers=config.workers, prefetch=config.prefetch,
                            interpolation=config.interpolation, seed=seed, data_format=config.data_format,
                            crop_pct=config.eval_crop_pct, mean=mean, std=std)
