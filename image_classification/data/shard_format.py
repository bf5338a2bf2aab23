"""The WebDataset shard layout that `python -m image_classification.data.shards` writes and shard_reader.py reads.

A converted folder holds, for each split, <split>-000000.tar, <split>-000001.tar, ... (`shard_name`), then
classes.txt and index.json; index.json is written last and marks a complete conversion (`read_index`). Each
sample is two adjacent tar members sharing a key, as WebDataset and DALI's `fn.readers.webdataset` expect:

    <class>_<n>.<ext>   the original file's bytes, unchanged; ext is its extension lowercased (jpeg, png, ...)
    <class>_<n>.cls     the class index as ASCII decimal text, e.g. b"417"

where <class> is the class index (4 digits or more) and <n> the image's position in its class folder in the
folder backend's order (6 digits or more) (`sample_key`), so a key names its source file and never holds a
dot. `iter_samples` reads a shard back with the standard library only.
"""
from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from .folder import DataError

SPLITS = ("train", "val")
FORMAT = "webdataset"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
LABEL_EXTENSION = "cls"

_TAR_BLOCK = tarfile.BLOCKSIZE


def shard_name(split: str, number: int) -> str:
    """The file name of shard `number` of `split`, e.g. train-000012.tar (WebDataset's brace patterns fit)."""
    return f"{split}-{number:06d}.tar"


def sample_key(label: int, number: int) -> str:
    """The key of the `number`-th image (folder order) of class `label`: no dots, unique within a dataset."""
    return f"{label:04d}_{number:06d}"


def read_index(output_dir: str | os.PathLike) -> dict:
    """The index.json of a converted folder, or DataError naming the file when it is missing or not ours."""
    path = Path(output_dir) / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {output_dir} is not a complete shard conversion") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} cannot be read: {err}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not a shard index (no \"format\": \"{FORMAT}\")")
    if index.get("version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {index.get('version')}; this code reads {FORMAT_VERSION}")
    return index


def iter_samples(shard_path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for each sample of a shard, in file order.

    Raises DataError naming the shard when it is truncated (a member cut short, or the end-of-archive blocks
    missing, which tarfile alone takes for a clean end), holds something other than files, or splits a
    sample's members apart.
    """
    path = Path(shard_path)
    seen: set[str] = set()
    key, members = None, {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise DataError(f"{path}: member {member.name} is not a regular file")
                name = member.name.rsplit("/", 1)[-1]
                if "." not in name:
                    raise DataError(f"{path}: member {member.name} has no extension")
                # As WebDataset: the key is everything before the first dot of the file name.
                member_key = member.name[: len(member.name) - len(name)] + name.split(".", 1)[0]
                ext = name.split(".", 1)[1]
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise DataError(f"{path} is truncated: member {member.name} is cut short")
                if member_key != key:
                    if key is not None:
                        yield key, members
                    if member_key in seen:
                        raise DataError(f"{path}: the members of sample {member_key} are not adjacent")
                    seen.add(member_key)
                    key, members = member_key, {}
                members[ext] = data
            end = tar.offset
            f.seek(end)
            marker = f.read(2 * _TAR_BLOCK)
    except tarfile.TarError as err:
        raise DataError(f"{path} is truncated or not a tar file ({err})") from None
    if len(marker) < 2 * _TAR_BLOCK or marker.count(0) != len(marker):
        raise DataError(f"{path} is truncated: no end-of-archive marker after {end} bytes")
    if key is not None:
        yield key, members
