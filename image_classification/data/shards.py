"""Convert an ImageNet-layout dataset into WebDataset tar shards (their layout: shard_format.py).

    python -m image_classification.data.shards --source /imagenet --output /imagenet-shards
    python -m image_classification.data.shards --source data/generated --output data/shards \\
        --shard-size 100 --split train,val --seed 0 --workers 4

Writes, for each split, <output>/<split>-000000.tar, <split>-000001.tar, ... and then classes.txt and
index.json. The images and labels are the folder backend's (`scan_split`): the same files, the same class
numbering, and a file the folder backend would find unreadable (`load_rgb` fails) is left out with a
warning naming it. The samples of a split are shuffled once, from --seed, before being cut into shards of
--shard-size samples (the last shard of a split may be shorter), so reading one shard front to back already
mixes the classes. Tar headers carry nothing of the machine or the moment (ustar, mtime 0, uid/gid 0, mode
0444), so the same source, seed and shard size give byte-identical shards.

index.json is written last and marks a complete conversion; shards and index are written under a temporary
name and renamed into place, so an interrupted conversion leaves no truncated file under a final name.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import multiprocessing.pool
import os
import random
import re
import signal
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import BinaryIO

from ..checkpoint import CLASS_NAMES_FILE, write_class_names
from ..cli import ArgumentParser, Number, run_cli
from ..logger import Progress
from .folder import BadFiles, DataError, ImageFolderIndex, dataset_classes, scan_split
from .pytorch_backend import load_rgb
from .shard_format import (FORMAT, FORMAT_VERSION, INDEX_FILE, LABEL_EXTENSION, SPLITS, sample_key,
                           shard_name)

# 1,000 samples are about 110 MB of ImageNet JPEGs (1,282 training shards): within WebDataset's advice of
# 100 MB to 1 GB per shard, and enough shards that every loader worker of every rank gets several.
DEFAULT_SHARD_SIZE = 1000
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)

SKIPPED = "left out of the shards"
_SHARD_NAME = re.compile(rf"^({'|'.join(SPLITS)})-\d{{6}}\.tar$")
# Files a killed conversion may have left: the hidden temporary names of _atomic_file.
_STALE_TEMP = re.compile(rf"^\.(({'|'.join(SPLITS)})-\d{{6}}\.tar|{re.escape(INDEX_FILE)})\..+\.tmp$")
# Paths handed to a worker at a time; a few chunks per worker are in flight, bounding the bytes held in memory.
_CHUNK = 16


@dataclass
class SplitSummary:
    """What was written for one split."""

    split: str
    shards: list[dict] = field(default_factory=list)  # {"name", "samples", "bytes"} in shard order
    skipped: list[str] = field(default_factory=list)  # unreadable source files
    extensions: set[str] = field(default_factory=set)

    @property
    def samples(self) -> int:
        return sum(shard["samples"] for shard in self.shards)

    @property
    def bytes(self) -> int:
        return sum(shard["bytes"] for shard in self.shards)

    def record(self) -> dict:
        """The split's entry in index.json."""
        return {"samples": self.samples, "bytes": self.bytes, "skipped": len(self.skipped),
                "extensions": sorted(self.extensions), "shards": self.shards}


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A new hidden file beside `path` to write; fsynced and renamed to `path` when the block ends, removed if
    it raises. A killed process leaves only the hidden name, which the next conversion removes."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o666 & ~_umask())  # NamedTemporaryFile makes 0600; a shard is a shared file
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A header with nothing of this machine or moment in it."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _add_sample(tar: tarfile.TarFile, key: str, ext: str, image: bytes, label: int) -> None:
    cls = str(label).encode("ascii")
    tar.addfile(_tar_member(f"{key}.{ext}", len(image)), io.BytesIO(image))
    tar.addfile(_tar_member(f"{key}.{LABEL_EXTENSION}", len(cls)), io.BytesIO(cls))


def _read_checked(path: str) -> tuple[bytes | None, str]:
    """The file's bytes if the folder backend can decode it (its own `load_rgb`), else (None, why not)."""
    try:
        load_rgb(path)
        with open(path, "rb") as f:
            return f.read(), ""
    except Exception as err:  # noqa: BLE001 - as FolderDataset: any decoder failure marks the one file bad
        return None, f"{type(err).__name__}: {err}"


def _read_chunk(paths: list[str]) -> list[tuple[bytes | None, str]]:
    return [_read_checked(path) for path in paths]


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the main process stops and terminates the pool itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _checked_files(paths: list[str], pool: multiprocessing.pool.Pool | None, workers: int
                   ) -> Iterator[tuple[bytes | None, str]]:
    """`_read_checked` of each path, in order: in this process, or in `pool` (of `workers` processes) with
    2 chunks per worker in flight, so that a slow disk for the shards never piles images up in memory."""
    if pool is None:
        yield from map(_read_checked, paths)
        return
    chunks = (paths[start:start + _CHUNK] for start in range(0, len(paths), _CHUNK))
    pending = deque(pool.apply_async(_read_chunk, (chunk,)) for chunk in islice(chunks, 2 * workers))
    while pending:
        results = pending.popleft().get()
        for chunk in islice(chunks, 1):
            pending.append(pool.apply_async(_read_chunk, (chunk,)))
        yield from results


def shuffled_samples(index: ImageFolderIndex, split: str, seed: int) -> list[tuple[str, int, str]]:
    """(path, label, key) of every sample of the split, in the order --seed gives.

    random.Random seeded with a string is the same generator on every Python 3 and platform, so the order
    (and so the shards) depends on the seed and the files only.
    """
    numbers: dict[int, int] = {}
    samples = []
    for path, label in index.samples:
        number = numbers.get(label, 0)
        numbers[label] = number + 1
        samples.append((path, label, sample_key(label, number)))
    random.Random(f"shards/{split}/{seed}").shuffle(samples)
    return samples


def write_split(index: ImageFolderIndex, split: str, output: Path, *, shard_size: int, seed: int,
                pool: multiprocessing.pool.Pool | None = None, workers: int = 0,
                bad_files: BadFiles | None = None, progress: bool = True) -> SplitSummary:
    """Write one split's shards into `output` (an existing folder); unreadable files are warned about and left out."""
    samples = shuffled_samples(index, split, seed)
    summary = SplitSummary(split)
    bad_files = bad_files if bad_files is not None else BadFiles()
    checked = _checked_files([path for path, _, _ in samples], pool, workers)
    display = Progress(f"{split} shards", len(samples), enabled=progress)
    position = 0

    def fill(f: BinaryIO) -> int:
        """Add samples to the tar in `f` until it holds shard_size of them or the split is done."""
        nonlocal position
        count = 0
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT, encoding="ascii") as tar:
            while count < shard_size and position < len(samples):
                path, label, key = samples[position]
                data, reason = next(checked)
                display.update(position, 1)
                position += 1
                if data is None:
                    bad_files.add(path, reason, SKIPPED)
                    summary.skipped.append(path)
                    continue
                ext = os.path.splitext(path)[1][1:].lower()
                summary.extensions.add(ext)
                _add_sample(tar, key, ext, data, label)
                count += 1
        return count

    try:
        while position < len(samples):
            name = shard_name(split, len(summary.shards))
            with _atomic_file(output / name) as f:
                count = fill(f)
                size = f.tell()
            if count == 0:  # only unreadable files were left: no empty shard
                (output / name).unlink()
                break
            summary.shards.append({"name": name, "samples": count, "bytes": size})
    finally:
        checked.close()
        display.close()
    if not summary.shards:
        raise DataError(f"{index.root}: none of its {len(samples)} images could be decoded")
    return summary


def _existing_shards(output: Path) -> list[str]:
    return sorted(name for name in os.listdir(output) if _SHARD_NAME.match(name) or name == INDEX_FILE)


def _prepare_output(output: Path, overwrite: bool) -> list[str]:
    """Create `output` or check it; the names of a previous conversion's files in it (refused without overwrite)."""
    if output.exists() and not output.is_dir():
        raise DataError(f"--output {output} is not a directory")
    output.mkdir(parents=True, exist_ok=True)
    existing = _existing_shards(output)
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise DataError(f"--output {output} already holds shards ({shown}); pass --overwrite to replace them")
    for name in os.listdir(output):
        if _STALE_TEMP.match(name):
            (output / name).unlink(missing_ok=True)
    # Without its index the folder is plainly incomplete until this conversion finishes.
    (output / INDEX_FILE).unlink(missing_ok=True)
    return existing


def _write_json(path: Path, record: dict) -> None:
    with _atomic_file(path) as f:
        f.write((json.dumps(record, indent=1) + "\n").encode("utf-8"))


def convert(source: str | os.PathLike, output: str | os.PathLike, *, splits: Iterable[str] = SPLITS,
            shard_size: int = DEFAULT_SHARD_SIZE, seed: int = 0, overwrite: bool = False, workers: int = 0,
            progress: bool = True) -> dict:
    """Convert `source` (ImageNet layout) into shards in `output`; returns the index.json record plus timings.

    Every requested split is scanned before anything is written, so a missing split folder or an output
    that already holds shards (without `overwrite`) is refused untouched. With `overwrite` the folder's
    previous conversion is replaced as a whole: its shards that this run does not rewrite are removed.
    """
    splits = list(dict.fromkeys(splits))
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise DataError(f"--split must name one or more of {', '.join(SPLITS)}, got {','.join(splits)!r}")
    if shard_size < 1:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    start = time.perf_counter()
    source = Path(source)
    classes = dataset_classes(source)
    indexes = {split: scan_split(source, split, len(classes)) for split in splits}
    output = Path(output)
    previous = _prepare_output(output, overwrite)

    bad_files = BadFiles()
    summaries: dict[str, SplitSummary] = {}
    pool = multiprocessing.Pool(workers, initializer=_ignore_sigint) if workers > 0 else None
    try:
        for split in splits:
            summaries[split] = write_split(indexes[split], split, output, shard_size=shard_size, seed=seed,
                                           pool=pool, workers=workers, bad_files=bad_files, progress=progress)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    written = {shard["name"] for summary in summaries.values() for shard in summary.shards}
    for name in previous:
        if name != INDEX_FILE and name not in written:
            (output / name).unlink(missing_ok=True)
    write_class_names(output, classes)  # training's own classes.txt, so classify.py --class-names reads it
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": str(source.resolve()),
        "num_classes": len(classes),
        "classes_file": CLASS_NAMES_FILE,
        "shard_size": shard_size,
        "seed": seed,
        "splits": {split: summary.record() for split, summary in summaries.items()},
    }
    _write_json(output / INDEX_FILE, index)
    return {**index, "seconds": time.perf_counter() - start,
            "skipped_files": {split: summary.skipped for split, summary in summaries.items()}}


def _format_bytes(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value, unit = size / 1000, "KB"
    for larger in ("MB", "GB", "TB"):
        if value < 1000:
            break
        value, unit = value / 1000, larger
    return f"{value:.1f} {unit}"


def _count(number: int, noun: str, plural: str = "") -> str:
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def summary_lines(result: dict, output: str | os.PathLike) -> list[str]:
    """The end-of-run summary: one line per split, then the totals."""
    lines = []
    for split, record in result["splits"].items():
        lines.append(f"{split}: {_count(record['samples'], 'sample')} in {_count(len(record['shards']), 'shard')} "
                     f"({_format_bytes(record['bytes'])}), {_count(record['skipped'], 'unreadable file')} left out")
    samples = sum(record["samples"] for record in result["splits"].values())
    shards = sum(len(record["shards"]) for record in result["splits"].values())
    size = sum(record["bytes"] for record in result["splits"].values())
    skipped = sum(record["skipped"] for record in result["splits"].values())
    seconds = result["seconds"]
    rate = (samples + skipped) / seconds if seconds > 0 else 0.0
    lines.append(f"wrote {_count(samples, 'sample')} of {_count(result['num_classes'], 'class', 'classes')} in "
                 f"{_count(shards, 'shard')} ({_format_bytes(size)}) to {output} in {seconds:.1f} s "
                 f"({rate:.0f} images/s); {_count(skipped, 'unreadable file')} left out")
    return lines


def _split_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SPLITS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"must be one or more of {', '.join(SPLITS)} separated by commas, "
                                         f"got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    """CLI: convert, print the summary; exit 1 with one line on bad input."""
    p = ArgumentParser(prog="python -m image_classification.data.shards",
                       description="Convert an ImageNet-layout dataset (<source>/train/<class>/*, "
                                   "<source>/val/<class>/*) into WebDataset tar shards.")
    p.add_argument("--source", required=True, type=Path, help="dataset folder holding train/ and val/")
    p.add_argument("--output", required=True, type=Path,
                   help="folder for <split>-NNNNNN.tar, classes.txt and index.json")
    p.add_argument("--shard-size", type=Number(int, low=1), default=DEFAULT_SHARD_SIZE,
                   help="samples per shard, the last of a split may hold fewer (default: %(default)s, "
                        "about 110 MB of ImageNet JPEGs)")
    p.add_argument("--split", type=_split_list, default=list(SPLITS),
                   help="splits to convert, comma-separated (default: train,val)")
    p.add_argument("--seed", type=Number(int, low=0), default=0,
                   help="seed of the write-time shuffle; the same seed writes the same bytes (default: 0)")
    p.add_argument("--workers", type=Number(int, low=0), default=DEFAULT_WORKERS,
                   help="processes that read and check the images, 0 for none (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards of a previous conversion in --output")
    args = p.parse_args(argv)
    result = run_cli(p.prog, convert, args.source, args.output, splits=args.split, shard_size=args.shard_size,
                     seed=args.seed, overwrite=args.overwrite, workers=args.workers)
    print("\n".join(summary_lines(result, args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
