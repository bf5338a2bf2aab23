"""The ImageNet folder layout, the per-epoch data order, and the record of unreadable files.

Shared by every file-based backend so that class indices, shuffling and shard membership are the same
whichever backend reads the images.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..cli import UserError, main_process

log = logging.getLogger(__name__)

# torchvision's ImageFolder list, compared case-insensitively as torchvision does; every one of these is
# also a format DALI's decoders read, so both backends consider the same files.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(UserError):
    """The dataset cannot be used as given (missing folder, no images, too many classes); one-line message."""


class UnreadableSample(Exception):
    """A sample whose encoded image cannot be had (the message says why): it is bad, the run goes on."""


@dataclass(frozen=True)
class ImageFolderIndex:
    """The images of one split: sorted class names and (path, class index) samples in a stable order."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def read(self, position: int) -> bytes:
        """The encoded bytes of sample `position`'s file, or UnreadableSample saying why not."""
        try:
            with open(self.samples[position][0], "rb") as f:
                return f.read()
        except OSError as err:
            raise UnreadableSample(f"cannot read: {err.strerror}") from None

    def epoch_order(self, *, epoch: int, seed: int, rank: int, world_size: int, shuffle: bool,
                    equal_shards: bool) -> list[int]:
        """This rank's sample numbers for `epoch`, in order: `shard_indices` of the samples."""
        return shard_indices(len(self.samples), epoch=epoch, seed=seed, rank=rank, world_size=world_size,
                             shuffle=shuffle, equal_shards=equal_shards)


def _class_folders(split_dir: Path) -> list[str]:
    # As ImageFolder's find_classes: entry.is_dir() follows symlinks, so a linked class folder counts.
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def class_images(class_dir: str) -> list[str]:
    """Image paths under `class_dir` at any depth, in torchvision ImageFolder's order.

    ImageFolder walks with os.walk(followlinks=True), sorts the (folder, subfolders, files) triples and
    each folder's file names; this does the same, except that a symlink back to a folder above it (a loop,
    which os.walk follows until the path is too long) is not followed. A symlink to a folder outside
    `class_dir` is followed too, with a warning naming it: its images take this class's label (a link back up
    to train/ would label every class's images as this one).
    """
    real_class_dir = os.path.realpath(class_dir)
    found: list[tuple[str, list[str]]] = []
    # (folder, the identities of it and of every folder above it up to class_dir)
    pending = [(class_dir, frozenset([_identity(class_dir)]))]
    while pending:
        folder, ancestors = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise DataError(f"{folder} cannot be read: {err.strerror}") from None
        names = []
        for entry in entries:
            if _is_dir(entry):
                identity = _identity(entry.path)
                if identity not in ancestors:
                    pending.append((entry.path, ancestors | {identity}))
                    if entry.is_symlink():
                        _warn_outside(entry.path, real_class_dir, class_dir)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                names.append(entry.name)
        found.append((folder, sorted(names)))
    found.sort(key=lambda item: item[0])
    return [os.path.join(folder, name) for folder, names in found for name in names]


def _warn_outside(link: str, real_class_dir: str, class_dir: str) -> None:
    """Warn when the folder symlink `link` leads outside its class folder."""
    target = os.path.realpath(link)
    if os.path.commonpath([target, real_class_dir]) != real_class_dir and main_process():  # every rank scans alike
        log.warning("%s is a link to %s, outside its class folder %s: its images are labelled as %s",
                    link, target, class_dir, os.path.basename(class_dir))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks, as os.walk(followlinks=True)
    except OSError:  # as os.walk: an entry that cannot be examined is not a folder
        return False


def _identity(folder: str) -> tuple[int, int]:
    """(device, inode) of a folder, symlinks followed: the same for every path that reaches it."""
    info = os.stat(folder)
    return info.st_dev, info.st_ino


def _check_root(data_dir: str | os.PathLike) -> Path:
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a directory")
    try:
        os.listdir(root)
    except OSError as err:
        raise DataError(f"data folder {root} cannot be read: {err.strerror}") from None
    return root


def dataset_classes(data_dir: str | os.PathLike) -> list[str]:
    """Sorted class-folder names of train/ and val/ together (folders, or symlinks to folders).

    Taking the union keeps class i the same class in both splits even when one split lacks a folder;
    when both splits have the same folders this is exactly torchvision ImageFolder's class list.
    """
    root = _check_root(data_dir)
    names: set[str] = set()
    for split in ("train", "val"):
        split_dir = root / split
        if split_dir.is_dir():
            try:
                names.update(_class_folders(split_dir))
            except OSError as err:
                raise DataError(f"{split_dir} cannot be read: {err.strerror}") from None
    return sorted(names)


def scan_split(data_dir: str | os.PathLike, split: str, num_classes: int) -> ImageFolderIndex:
    """Index `<data_dir>/<split>/<class>/**` by torchvision ImageFolder's rules, or raise DataError naming the path.

    Images (IMG_EXTENSIONS, any case) are found at any depth under each class folder, following symlinks,
    in ImageFolder's order; a class folder without images is an error, as in ImageFolder. The classes are
    the union of both splits' folders (see `dataset_classes`), so a class missing from one split is fine.
    """
    root = _check_root(data_dir)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is missing: expected {split}/<class>/<image> under the data folder {root}")
    classes = dataset_classes(root)
    if not classes:
        raise DataError(f"{split_dir} has no class folders: expected {split}/<class>/<image>")
    if len(classes) > num_classes:
        raise DataError(f"{root} has {len(classes)} classes but the model has --num_classes {num_classes}")
    samples: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a class of the other split only
        paths = class_images(str(class_dir))
        if not paths:
            empty.append(name)
        samples.extend((path, label) for path in paths)
    if empty:
        # ImageFolder refuses empty class folders too ("Found no valid file for the classes ...").
        raise DataError(f"{split_dir} has class folders without images: {', '.join(empty)} "
                        f"(extensions {', '.join(IMG_EXTENSIONS)}); remove them or add images")
    if not samples:
        raise DataError(f"{split_dir} holds no images (extensions {', '.join(IMG_EXTENSIONS)})")
    return ImageFolderIndex(split_dir, classes, samples)


def epoch_seed(seed: int, epoch: int, *keys: int) -> int:
    """A 63-bit seed that depends on (seed, epoch, keys...) only: the base of every per-epoch random choice."""
    state = np.random.SeedSequence([seed % 2**63, epoch, *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def shard_indices(num_items: int, *, epoch: int, seed: int, rank: int, world_size: int, shuffle: bool,
                  equal_shards: bool) -> list[int]:
    """This rank's dataset indices for `epoch`, in order.

    The global order is a permutation seeded by (seed, epoch) (identity without `shuffle`), split
    round-robin over ranks like DistributedSampler, so shards are disjoint. With `equal_shards` (training)
    the last `num_items % world_size` items of the permutation are left out so that every rank runs the
    same number of batches (DistributedSampler pads with duplicates instead; leaving out keeps shards
    disjoint, and shuffling leaves out different items each epoch). Without it (validation) the shards
    cover every item exactly once and may differ in length by one.
    """
    order = _permutation(num_items, epoch, seed) if shuffle else list(range(num_items))
    if equal_shards:
        order = order[: num_items - num_items % world_size]
    return order[rank::world_size]


def _permutation(num_items: int, epoch: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(num_items, generator=generator).tolist()


def repeated_samples(num_items: int, *, epoch: int, seed: int, rank: int, world_size: int, repeats: int
                     ) -> list[tuple[int, int]]:
    """This rank's (dataset index, repeat number) pairs for a training `epoch` under repeated augmentation (DeiT's
    RASampler, timm's RepeatAugSampler).

    The epoch's permutation (shard_indices') with every item written `repeats` times in a row is dealt round-robin
    over the ranks, so that an image's repeats go to different ranks (to the same rank when there are fewer ranks
    than repeats); each rank keeps its first num_items // world_size, so an epoch has its usual length and reads
    about 1/repeats of the images. The same arguments give the same pairs: a resumed epoch continues exactly.
    """
    order = _permutation(num_items, epoch, seed)
    # Position p of the repeated sequence is item order[p // repeats], repeat p % repeats; rank r deals r, r + W, ...
    positions = range(rank, rank + world_size * (num_items // world_size), world_size)
    return [(order[p // repeats], p % repeats) for p in positions]


def epoch_samples(index: ImageFolderIndex, *, epoch: int, seed: int, rank: int, world_size: int, train: bool,
                  repeats: int = 1) -> list[tuple[int, int]]:
    """This rank's (sample number, repeat number) pairs for `epoch`, in order: the index's own order (a training
    epoch shuffled and split into equal shards, validation in order), every repeat number 0; or, for training with
    `repeats` > 1, repeated_samples' over every sample of the index (shards too, so that their reading order is then
    the folders')."""
    if train and repeats > 1:
        return repeated_samples(len(index.samples), epoch=epoch, seed=seed, rank=rank, world_size=world_size,
                                repeats=repeats)
    order = index.epoch_order(epoch=epoch, seed=seed, rank=rank, world_size=world_size, shuffle=train,
                              equal_shards=train)
    return [(position, 0) for position in order]


def shard_size(num_items: int, *, rank: int, world_size: int, equal_shards: bool) -> int:
    """len(shard_indices(...)) without building the order."""
    if equal_shards:
        return num_items // world_size
    return math.ceil((num_items - rank) / world_size) if rank < num_items else 0


# What happens to a sample whose file is unreadable (BadFiles.add's `outcome`): training keeps its batches
# full, validation must score the readable images only, each once.
REPLACED = "replaced by the next readable image"
DROPPED = "left out of its validation batch"


class BadFiles:
    """Files that could not be decoded: each is warned about once (naming it) and remembered."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}

    def add(self, path: str, reason: str, outcome: str = REPLACED) -> None:
        """Record `path` as unreadable; the first time, log a warning naming it and what became of its sample."""
        if path in self._reasons:
            return
        self._reasons[path] = reason
        log.warning("unreadable image %s (%s); %s", path, reason, outcome)

    def restore(self, reasons: dict[str, str]) -> None:
        """Remember files another process found unreadable (and warned about already), without warning again."""
        self._reasons.update(reasons)

    def __contains__(self, path: str) -> bool:
        return path in self._reasons

    def __len__(self) -> int:
        return len(self._reasons)

    def paths(self) -> list[str]:
        return sorted(self._reasons)

    def reasons(self) -> dict[str, str]:
        return dict(self._reasons)
