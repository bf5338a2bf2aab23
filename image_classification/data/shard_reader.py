"""Reading WebDataset tar shards (written by `python -m image_classification.data.shards`) for training and
validation, and --data-format detection.

A `ShardIndex` has the interface of the folder backend's ImageFolderIndex (`root`, `classes`, `samples`,
`read`, `epoch_order`), so every backend reads shards through the code it uses for folders: the same
augmentation, normalisation, per-sample seeding, replacement of unreadable samples and exact mid-epoch
resume. It is built by walking each shard's tar headers once (one 512-byte read per member, the members'
data skipped; only the few bytes of each `.cls` member are read; Python's tarfile walks tars with pax or GNU
headers), recording where each image's bytes lie; a reader then takes one image with a single `os.pread` on a
shard file it keeps open.

Sample names: `<shard path>:<member name>`, e.g. /data/shards/train-000003.tar:0007_000012.jpg, so a warning
names the shard and the key. A sample is bad (training replaces it, validation drops it, each counted as an
unreadable file is) when its `.cls` member is missing, not ASCII decimal or not a class index, when it has no
image member, or when its image is cut short by a truncated shard. A truncated or damaged shard is warned
about once, naming it; its complete samples are used.

Data order (`ShardIndex.epoch_order`): training permutes the shards by (seed, epoch), lays their samples end
to end and gives each rank one contiguous stretch of len // world_size samples, which it then permutes by
(seed, epoch, rank). Ranks read disjoint samples, the same number each (exactly the folder backend's count,
whatever the shard sizes, also with fewer shards than ranks), from about shards / world_size shards each;
the up to world_size - 1 samples left over are at the end of the epoch's last shard, so they change every
epoch. Validation keeps file order and gives the first len % world_size ranks one sample more, so that every
sample is scored exactly once.

DALI reads shards through the same external source as folders, not `fn.readers.webdataset`: that reader
shuffles through a buffer and splits shards by its own rule, so it could give neither the pytorch backend's
order nor an exact mid-epoch resume.
"""
from __future__ import annotations

import logging
import os
import tarfile
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CLASS_NAMES_FILE
from ..cli import main_process
from . import DATA_FORMATS
from .folder import IMG_EXTENSIONS, DataError, UnreadableSample, epoch_seed
from .shard_format import INDEX_FILE, LABEL_EXTENSION, read_index

log = logging.getLogger(__name__)

_IMAGE_EXTENSIONS = frozenset(ext[1:] for ext in IMG_EXTENSIONS)
_TAR_BLOCK = tarfile.BLOCKSIZE
# Tell the within-rank shuffle's seed apart from every other epoch_seed use (those pass at most 4 keys).
_RANK_SHUFFLE = 0x5A4D
# Shard files a reading process keeps open: a rank's shards for a few batches, well under any ulimit.
_OPEN_SHARDS = 64
# Threads walking shard headers: on a network file system the walk mostly waits for its reads.
_WALK_THREADS = 16


# --- format detection --------------------------------------------------------------------------------------

def _holds_folders(root: Path) -> bool:
    return (root / "train").is_dir() or (root / "val").is_dir()


def _holds_shards(root: Path) -> bool:
    return (root / INDEX_FILE).exists() or any(root.glob("*.tar"))


def resolve_format(data_dir: str | os.PathLike, data_format: str) -> str:
    """"folder" or "shards" for `data_dir` under --data-format, or DataError in one line saying what is there.

    auto: folder when DIR has a train/ or val/ folder, else shards when it holds index.json or *.tar files.
    """
    if data_format not in DATA_FORMATS:
        raise DataError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist" if not root.exists()
                        else f"data folder {root} is not a directory")
    if data_format == "folder" and not _holds_folders(root) and _holds_shards(root):
        raise DataError(f"{root} holds tar shards, not train/ and val/ class folders; use --data-format shards "
                        "(or auto)")
    if data_format == "shards" and not (root / INDEX_FILE).exists() and _holds_folders(root):
        raise DataError(f"{root} holds class folders, not shards with {INDEX_FILE}; use --data-format folder "
                        "(or auto), or convert it with python -m image_classification.data.shards")
    if data_format != "auto":
        return data_format
    if _holds_folders(root):
        return "folder"
    if _holds_shards(root):
        return "shards"
    raise DataError(f"{root} holds neither train/ and val/ class folders nor tar shards with {INDEX_FILE} "
                    "(--data-format auto)")


# --- the index -------------------------------------------------------------------------------------------------

@dataclass
class _ShardWalk:
    """What one walk of a shard's headers found: per sample its member name, label (-1 when bad), image data
    offset and size, and the reason it is bad (or ""); what is wrong with the shard as a whole (or "")."""

    names: list[str]
    labels: list[int]
    offsets: list[int]
    sizes: list[int]
    problems: list[str]
    damage: str


def _parse_label(data: bytes, num_classes: int) -> tuple[int, str]:
    """(label, "") from a .cls member's bytes, or (-1, why it is not a class index)."""
    text = data.strip()
    if not text.isdigit():  # bytes.isdigit: ASCII digits only, so no sign, space or other script
        return -1, f"its .{LABEL_EXTENSION} member {data[:20]!r} is not a class index in ASCII decimal"
    label = int(text)
    if label >= num_classes:
        return -1, f"its .{LABEL_EXTENSION} member says class {label}, but there are {num_classes} classes"
    return label, ""


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) as WebDataset splits a member name: at the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


# (member name, data offset, data size) of a shard's regular files, in file order
Entries = list[tuple[str, int, int]]

_REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
# Members that carry no sample and need no interpreting: folders, links, devices, FIFOs.
_SKIPPED_TYPES = (tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE,
                  tarfile.FIFOTYPE)
_PLAIN_TYPES = _REGULAR_TYPES + _SKIPPED_TYPES


class _NotPlain(Exception):
    """A header that only tarfile interprets (pax, GNU long names, sizes in base 256)."""


def _octal(field: bytes) -> int | None:
    """A tar header's octal number field (NUL or space terminated), or None when it holds something else."""
    digits = field.split(b"\0", 1)[0].strip()
    if not digits or digits.strip(b"01234567"):
        return None
    return int(digits, 8)


def _plain_entries(fd: int, file_size: int) -> tuple[Entries, str]:
    """The entries of a plain ustar/v7 tar, such as the converter writes, from its headers alone; and what is
    wrong with it (or ""). tarfile's own walk costs ~40 us a header in Python, 2.5 minutes per process for
    ImageNet's 2.5 million members; this one reads and checks only what the index needs."""
    entries: Entries = []
    offset = 0
    while True:
        header = os.pread(fd, _TAR_BLOCK, offset)
        if len(header) < _TAR_BLOCK:
            return entries, f"truncated at byte {file_size} (a header cut short or missing)"
        if header == bytes(_TAR_BLOCK):
            if os.pread(fd, _TAR_BLOCK, offset + _TAR_BLOCK) != bytes(_TAR_BLOCK):
                return entries, f"truncated or damaged after byte {offset} (no end-of-archive marker there)"
            return entries, ""
        kind, size = header[156:157], _octal(header[124:136])
        # Anything unusual (another checksum convention, a size in base 256, a pax or GNU header) goes to
        # tarfile, which also judges a damaged header.
        if (_octal(header[148:156]) != sum(header[:148]) + 8 * 32 + sum(header[156:]) or size is None
                or kind not in _PLAIN_TYPES):
            raise _NotPlain
        if kind in _REGULAR_TYPES:
            name = header[:100].split(b"\0", 1)[0]
            if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar's prefix (GNU's magic differs)
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            entries.append((name.decode("utf-8", "surrogateescape"), offset + _TAR_BLOCK, size))
        offset += _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _tarfile_entries(fd: int, file_size: int) -> tuple[Entries, str]:
    """_plain_entries by tarfile, for the tars it alone reads (pax headers, GNU long names)."""
    entries: Entries = []
    damage = ""
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            f.seek(0)  # the duplicate shares the descriptor's position
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in tar:
                    if member.isfile():
                        entries.append((member.name, member.offset_data, member.size))
                end = tar.offset
            f.seek(end)
            if f.read(2 * _TAR_BLOCK) != bytes(2 * _TAR_BLOCK):
                damage = f"truncated or damaged after byte {end} (no end-of-archive marker there)"
    except tarfile.TarError as err:  # a header cut short or corrupt where the next member should start
        damage = f"truncated or damaged ({err})" if entries else f"not a readable tar file ({err})"
    return entries, damage


def _walk(path: Path, num_classes: int, expected: int) -> _ShardWalk:
    """Walk the headers of one shard, skipping the members' data; read only the .cls members."""
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        try:
            entries, damage = _plain_entries(fd, file_size)
        except _NotPlain:
            entries, damage = _tarfile_entries(fd, file_size)
        groups: list[tuple[str, dict[str, tuple[str, int, int]]]] = []  # (key, {extension: entry}), file order
        labels: dict[int, bytes] = {}  # group number -> its .cls bytes
        for entry in entries:
            name, offset, size = entry
            key, ext = _split_name(name)
            ext = ext.lower()
            if not groups or groups[-1][0] != key:
                groups.append((key, {}))
            groups[-1][1].setdefault(ext, entry)
            if ext == LABEL_EXTENSION and offset + size <= file_size:
                labels[len(groups) - 1] = os.pread(fd, min(size, 64), offset)
    finally:
        os.close(fd)
    walk = _ShardWalk([], [], [], [], [], "")
    for number, (key, members) in enumerate(groups):
        name, offset, size = next((members[ext] for ext in members if ext in _IMAGE_EXTENSIONS), (key, 0, 0))
        label, problem = -1, ""
        if name == key:
            problem = f"no image member (extensions {', '.join(sorted(_IMAGE_EXTENSIONS))})"
        elif offset + size > file_size:
            problem = f"cut short: the shard ends at byte {file_size}"
        elif number not in labels:
            problem = f"no complete .{LABEL_EXTENSION} member"
        else:
            label, problem = _parse_label(labels[number], num_classes)
        walk.names.append(name)
        walk.labels.append(label)
        walk.offsets.append(offset)
        walk.sizes.append(size)
        walk.problems.append(problem)
    if damage or len(groups) != expected:
        walk.damage = (f"shard {path} is {damage or 'not the one indexed'}: {len(groups)} of the {expected} samples "
                       f"{INDEX_FILE} lists are in it")
    return walk


# Walks by (shard path, size, modification time): a progressive run rebuilds its train loader at every stage.
_WALKS: dict[tuple[str, int, int, int], _ShardWalk] = {}
_WALKS_LOCK = threading.Lock()


def _cached_walk(path: Path, num_classes: int, expected: int) -> _ShardWalk:
    info = os.stat(path)
    key = (str(path), info.st_size, info.st_mtime_ns, num_classes)
    with _WALKS_LOCK:
        walk = _WALKS.get(key)
    if walk is None:
        walk = _walk(path, num_classes, expected)
        with _WALKS_LOCK:
            _WALKS[key] = walk
    return walk


class _OpenShards:
    """Shard files this process has open, least recently used closed first.

    A forked DataLoader worker inherits the descriptors, which pread (positionless) shares safely; a pickled
    copy (spawned workers) starts with none.
    """

    def __init__(self, limit: int = _OPEN_SHARDS) -> None:
        self.limit = limit
        self._files: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def pread(self, path: str, size: int, offset: int) -> bytes:
        """`size` bytes of `path` from `offset` (fewer at its end)."""
        with self._lock:
            fd = self._files.pop(path, None)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                if len(self._files) >= self.limit:
                    os.close(self._files.popitem(last=False)[1])
            self._files[path] = fd
            # Read under the lock too: another thread must not close this descriptor (and reuse its number) meanwhile.
            return os.pread(fd, size, offset)

    def close(self) -> None:
        """Close every open shard file."""
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()

    def __getstate__(self) -> dict:
        return {"limit": self.limit}  # descriptors do not travel to another process

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["limit"])

    def __del__(self) -> None:
        self.close()


class ShardIndex:
    """The samples of one split of a shard conversion, with ImageFolderIndex's interface.

    samples: (name, label) in shard order, then file order; `read(i)` gives sample i's image bytes;
    `shard_starts[s]:shard_starts[s + 1]` are the sample numbers of shard s.
    """

    def __init__(self, root: Path, classes: list[str], shard_paths: list[Path], walks: list[_ShardWalk]) -> None:
        self.root, self.classes = root, classes
        self.shard_paths = [str(path) for path in shard_paths]
        self.samples = [(f"{path}:{name}", label) for path, walk in zip(self.shard_paths, walks)
                        for name, label in zip(walk.names, walk.labels)]
        self.shard_starts = np.cumsum([0] + [len(walk.names) for walk in walks]).tolist()
        self._shard_of = np.repeat(np.arange(len(walks), dtype=np.int32), [len(walk.names) for walk in walks])
        self._offsets = np.array([o for walk in walks for o in walk.offsets], dtype=np.int64)
        self._sizes = np.array([s for walk in walks for s in walk.sizes], dtype=np.int64)
        self._problems = {i: problem for i, problem in enumerate(p for walk in walks for p in walk.problems)
                          if problem}
        self._files = _OpenShards()

    @property
    def paths(self) -> list[str]:
        return [name for name, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def read(self, position: int) -> bytes:
        """The image bytes of sample `position`, or UnreadableSample saying why not."""
        problem = self._problems.get(position)
        if problem:
            raise UnreadableSample(problem)
        path = self.shard_paths[self._shard_of[position]]
        size = int(self._sizes[position])
        try:
            data = self._files.pread(path, size, int(self._offsets[position]))
        except OSError as err:
            raise UnreadableSample(f"cannot read {path}: {err.strerror}") from None
        if len(data) != size:
            raise UnreadableSample(f"cut short: {len(data)} of {size} bytes (the shard has changed or is truncated)")
        return data

    def epoch_order(self, *, epoch: int, seed: int, rank: int, world_size: int, shuffle: bool,
                    equal_shards: bool) -> list[int]:
        """This rank's sample numbers for `epoch`, in order (see the module's notes; sizes as shard_size's)."""
        if shuffle:
            generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            shards = torch.randperm(len(self.shard_paths), generator=generator).tolist()
        else:
            shards = range(len(self.shard_paths))
        starts = self.shard_starts
        sequence = [i for shard in shards for i in range(starts[shard], starts[shard + 1])]
        base, extra = divmod(len(sequence), world_size)
        if equal_shards:
            start, stop = rank * base, (rank + 1) * base
        else:
            start = rank * base + min(rank, extra)
            stop = start + base + (rank < extra)
        mine = sequence[start:stop]
        if not shuffle:
            return mine
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank, world_size, _RANK_SHUFFLE))
        return [mine[i] for i in torch.randperm(len(mine), generator=generator).tolist()]


def _read_classes(root: Path, index: dict) -> list[str]:
    path = root / index.get("classes_file", CLASS_NAMES_FILE)
    try:
        classes = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"{path} cannot be read: {err.strerror}") from None
    if len(classes) != index.get("num_classes"):
        raise DataError(f"{path} names {len(classes)} classes but {root / INDEX_FILE} says "
                        f"{index.get('num_classes')}")
    return classes


def shard_classes(data_dir: str | os.PathLike) -> list[str]:
    """The class names of the shards in `data_dir`, in index order (its classes.txt), or DataError."""
    root = Path(data_dir)
    return _read_classes(root, read_index(root))


def scan_shards(data_dir: str | os.PathLike, split: str, num_classes: int) -> ShardIndex:
    """Index `<data_dir>/<split>-NNNNNN.tar` by its index.json, or raise DataError naming what is wrong."""
    root = Path(data_dir)
    index = read_index(root)
    record = index.get("splits", {}).get(split)
    if record is None:
        converted = ", ".join(index.get("splits", {})) or "none"
        raise DataError(f"{root / INDEX_FILE} has no {split} split (converted: {converted}); convert it with "
                        f"python -m image_classification.data.shards --split {split}")
    classes = _read_classes(root, index)
    if len(classes) > num_classes:
        raise DataError(f"{root} has {len(classes)} classes but the model has --num_classes {num_classes}")
    shards = record.get("shards") if isinstance(record, dict) else None
    if not isinstance(shards, list) or not all(isinstance(shard, dict) and isinstance(shard.get("name"), str)
                                               and isinstance(shard.get("samples"), int) for shard in shards):
        raise DataError(f"{root / INDEX_FILE}: the {split} split's shard list is not a list of "
                        "{\"name\", \"samples\"} records")
    paths = [root / shard["name"] for shard in shards]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"{missing[0]} is missing ({len(missing)} of the {len(paths)} {split} shards that "
                        f"{root / INDEX_FILE} lists)")
    with ThreadPoolExecutor(max_workers=max(1, min(_WALK_THREADS, len(paths)))) as pool:
        walks = list(pool.map(lambda item: _cached_walk(item[0], len(classes), item[1]["samples"]),
                              zip(paths, shards)))
    for walk in walks:
        # Its bad samples (a cut-short image, say) are named when a loader reaches them; every rank walks every
        # shard, and rank 0 says what it found.
        if walk.damage and main_process():
            log.warning("%s", walk.damage)
    shard_index = ShardIndex(root, classes, paths, walks)
    if not shard_index.samples:
        raise DataError(f"the {split} shards of {root} hold no samples")
    return shard_index
