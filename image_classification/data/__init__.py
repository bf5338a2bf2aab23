"""Data pipelines: `build_train_loader` / `build_val_loader` for every --data-backend.

    train = build_train_loader("pytorch", "/imagenet", image_size=224, batch_size=256, ctx=ctx, seed=0)
    for epoch in range(epochs):
        train.set_epoch(epoch)                 # set_epoch(epoch, skip_batches=n) resumes mid-epoch
        for images, labels in train:           # float32 [B,3,S,S] normalised, int64 [B], on ctx.device
            ...

Backends: pytorch (torchvision transforms in DataLoader workers), dali-cpu and dali-gpu (NVIDIA DALI,
CPU or nvJPEG decoding), synthetic (one random batch, no I/O). All file-based backends read
`<data>/train/<class>/**` and `<data>/val/<class>/**` by torchvision ImageFolder's rules (images at any
depth, symlinks followed, an empty class folder is an error), or (`data_format`, see webdataset.py) the
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

import os
from typing import TYPE_CHECKING

from ..cli import UserError
from ..config import DataConfig
from ..context import ExecutionContext
from .folder import IMG_EXTENSIONS, DataError, ImageFolderIndex, dataset_classes, scan_split
from .loader import MAGNITUDE_BINS, MEAN, STD, Loader, Triple

if TYPE_CHECKING:  # imported when used: it pulls in the shard writer and torchvision
    from .shard_reader import ShardIndex

BACKENDS = ("pytorch", "dali-cpu", "dali-gpu", "synthetic")
# autoaugment: the reference's (TensorFlow EfficientNet's policy_v0, autoaugment.py); autoaugment-paper:
# torchvision's AutoAugment ImageNet policy (pytorch backend only).
AUGMENTATIONS = (None, "autoaugment", "autoaugment-paper", "randaugment", "trivialaugment")
INTERPOLATIONS = ("bilinear", "bicubic", "triangular")
DATA_FORMATS = ("auto", "folder", "shards")

__all__ = ["AUGMENTATIONS", "BACKENDS", "DATA_FORMATS", "IMG_EXTENSIONS", "INTERPOLATIONS", "MAGNITUDE_BINS", "MEAN", "STD",
           "DataError", "Loader", "build_train_loader", "build_val_loader", "dataset_class_names", "dataset_classes",
           "scan_data",
           "train_loader_of", "val_loader_of"]


def _check_choices(backend: str, interpolation: str, augmentation: str | None = None) -> None:
    if backend not in BACKENDS:
        raise UserError(f"--data-backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if augmentation not in AUGMENTATIONS:
        names = ", ".join(a for a in AUGMENTATIONS if a is not None)
        raise UserError(f"--augmentation must be None (no policy) or one of {names}, got {augmentation!r}")


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
    """The index of one split: class folders (ImageFolderIndex) or tar shards (webdataset.ShardIndex), as
    --data-format says or, with auto, as the data folder holds."""
    from .shard_reader import resolve_format, scan_shards
    if data_dir is None:
        raise DataError("no data folder given (DIR)")
    if resolve_format(data_dir, data_format) == "shards":
        return scan_shards(data_dir, split, num_classes)
    return scan_split(data_dir, split, num_classes)


def dataset_class_names(data_dir: str | os.PathLike | None, data_format: str = "auto") -> list[str]:
    """The classes of a dataset in index order, without indexing its images: the class folders of both splits, or
    the shards' classes.txt (DataError when neither can be read)."""
    from .shard_reader import resolve_format, shard_classes
    if data_dir is None:
        raise DataError("no data folder given (DIR)")
    if resolve_format(data_dir, data_format) == "shards":
        return shard_classes(data_dir)
    return dataset_classes(data_dir)


def _file_loader(backend: str, index: ImageFolderIndex, *, train: bool, image_size: int, batch_size: int,
                 ctx: ExecutionContext, workers: int, prefetch: int, interpolation: str,
                 augmentation: str | None, magnitude: int, seed: int, crop_pct: float | None = None,
                 repeats: int = 1, mean: Triple = MEAN, std: Triple = STD) -> Loader:
    if backend == "pytorch":
        from .pytorch_backend import PytorchLoader, train_transform, val_transform
        transform = (train_transform(image_size, interpolation, augmentation, magnitude) if train
                     else val_transform(image_size, interpolation, crop_pct))
        return PytorchLoader(index, transform, train=train, batch_size=batch_size, ctx=ctx, workers=workers,
                             prefetch=prefetch, seed=seed, repeats=repeats, mean=mean, std=std)
    from .dali_backend import DaliLoader
    return DaliLoader(index, train=train, gpu=backend == "dali-gpu", image_size=image_size, batch_size=batch_size,
                      ctx=ctx, workers=workers, prefetch=prefetch, interpolation=interpolation,
                      augmentation=augmentation, magnitude=magnitude, seed=seed, crop_pct=crop_pct, repeats=repeats,
                      mean=mean, std=std)


def build_train_loader(backend: str, data_dir: str | None, *, image_size: int, batch_size: int,
                       ctx: ExecutionContext, num_classes: int = 1000, workers: int = 5, prefetch: int = 2,
                       interpolation: str = "bilinear", augmentation: str | None = None,
                       randaug_magnitude: int = 9, seed: int | None = None, data_format: str = "auto",
                       repeated_augment: int = 1, mean: Triple = MEAN, std: Triple = STD) -> Loader:
    """Training batches: random-resized crop, flip, optional augmentation policy; shuffled (each epoch's images read
    `repeated_augment` times each, folder.repeated_samples); last partial dropped; normalised by `mean`/`std`
    (0..255 scale: ImageNet's, or the model's own)."""
    _check_choices(backend, interpolation, augmentation)
    _check_sizes(image_size, batch_size, workers)
    if not 0 <= randaug_magnitude < MAGNITUDE_BINS:
        raise UserError(f"--randaug-magnitude must be between 0 and {MAGNITUDE_BINS - 1}, got {randaug_magnitude}")
    seed = _resolve_seed(seed)
    if backend == "synthetic":
        if repeated_augment > 1:
            raise UserError("--repeated-augment repeats the images of a dataset; --data-backend synthetic has none")
        from .synthetic import SyntheticLoader
        return SyntheticLoader(image_size=image_size, batch_size=batch_size, ctx=ctx, num_classes=num_classes,
                               seed=seed)
    index = scan_data(data_dir, "train", num_classes, data_format)
    per_rank = len(index.samples) // ctx.world_size
    if per_rank < batch_size:
        raise DataError(f"{index.root} has {len(index.samples)} images: fewer than one batch of {batch_size} "
                        f"per process ({ctx.world_size} processes); lower --batch-size")
    return _file_loader(backend, index, train=True, image_size=image_size, batch_size=batch_size, ctx=ctx,
                        workers=workers, prefetch=prefetch, interpolation=interpolation,
                        augmentation=augmentation, magnitude=randaug_magnitude, seed=seed, repeats=repeated_augment,
                        mean=mean, std=std)


def build_val_loader(backend: str, data_dir: str | None, *, image_size: int, batch_size: int,
                     ctx: ExecutionContext, num_classes: int = 1000, workers: int = 5, prefetch: int = 2,
                     interpolation: str = "bilinear", seed: int | None = None, data_format: str = "auto",
                     crop_pct: float | None = None, mean: Triple = MEAN, std: Triple = STD) -> Loader:
    """Validation batches: short side to image_size+32 (or round(image_size/crop_pct)), centre crop; dataset
    order; every image once; normalised by `mean`/`std` (0..255 scale: ImageNet's, or the model's own)."""
    _check_choices(backend, interpolation)
    _check_sizes(image_size, batch_size, workers)
    seed = _resolve_seed(seed)
    if backend == "synthetic":
        from .synthetic import VAL_BATCHES, SyntheticLoader
        return SyntheticLoader(image_size=image_size, batch_size=batch_size, ctx=ctx, num_classes=num_classes,
                               batches_per_epoch=VAL_BATCHES, seed=seed + 1)
    index = scan_data(data_dir, "val", num_classes, data_format)
    return _file_loader(backend, index, train=False, image_size=image_size, batch_size=batch_size, ctx=ctx,
                        workers=workers, prefetch=prefetch, interpolation=interpolation, augmentation=None,
                        magnitude=0, seed=seed, crop_pct=crop_pct, mean=mean, std=std)


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
