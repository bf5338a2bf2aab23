"""Atomic file writes: a reader sees the old file or the new one, never part of one.

    atomic_save(checkpoint.to_dict(), "ws/checkpoint.pth.tar")     # torch.save
    atomic_save_safetensors(model.state_dict(), "b0.safetensors")
    atomic_copy("ws/checkpoint.pth.tar", "ws/model_best.pth.tar")
    atomic_write_text("ws/config.yaml", text)

A write that fails because the file system is read-only or full raises WriteError, one line naming the file,
and keeps the previous file; any other failure is raised as it is.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .cli import UserError


class WriteError(UserError):
    """A file that could not be written because its file system is read-only or full; the previous one is kept."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically (see _atomic_write)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f), _tensor_bytes(obj))


def atomic_save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as safetensors (tensors only, no code can run on load) atomically (see _atomic_write)."""
    from safetensors.torch import save
    data = save({name: tensor.detach().contiguous() for name, tensor in state_dict.items()}, metadata={"format": "pt"})
    _atomic_write(Path(path), lambda f: f.write(data), len(data))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy `src` to `dst` atomically."""
    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f, 1 << 20)
    _atomic_write(Path(dst), copy, os.path.getsize(src))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` as a UTF-8 file atomically."""
    data = text.encode("utf-8")
    _atomic_write(Path(path), lambda f: f.write(data), len(data))


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], needed: int) -> None:
    """Call `write(file)` on a new file beside `path`, fsync it, then put it in place of `path`.

    Readers see the old file or the new one, never part of one. On Linux the new file has no name until it
    is complete (O_TMPFILE): a process killed mid-write, even by SIGKILL, leaves nothing behind, and a failed
    write gives its space back at once. Elsewhere it is a hidden `.<name>.<random>.tmp`, removed when the
    write fails and by the next CheckpointWriter in that folder. The file gets the mode the umask gives, as
    torch.save's files do. `needed` (bytes, an estimate) is for the message when the disk is full.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if not _write_unnamed(path, write):
            _write_named(path, write)
    except Exception as err:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
        message = _write_failure_message(err, path, needed)
        if message is None:
            raise
        raise WriteError(message) from None
    # Make the rename itself durable.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _write_unnamed(path: Path, write: Callable[[BinaryIO], None]) -> bool:
    """The O_TMPFILE way; False where the system or file system does not offer it."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return False
    try:
        fd = os.open(path.parent, flag | os.O_WRONLY, 0o666)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return False
        raise
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        # Give the finished file a (hidden) name through /proc, then rename it over the target.
        tmp = path.parent / f".{path.name}.{os.getpid()}.{fd}.tmp"
        try:
            os.link(f"/proc/self/fd/{fd}", tmp, follow_symlinks=True)
        except OSError:  # no /proc (some containers): the caller writes a named file instead
            return False
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _write_named(path: Path, write: Callable[[BinaryIO], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_failure_message(err: BaseException, path: Path, needed: int) -> str | None:
    """One line for a write that failed because the file system is read-only or full (ENOSPC/EDQUOT, or
    torch.save's own error while the folder has less free space than the file needs); None for any other
    failure. The error's own reason comes first: a small read-only file system is not a full one."""
    if isinstance(err, OSError) and err.errno == errno.EROFS or _read_only(path.parent):
        return f"cannot write {path}: its file system is read-only; the previous file is kept"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if isinstance(err, OSError):
        no_space = err.errno in (errno.ENOSPC, errno.EDQUOT)
    else:  # torch.save's RuntimeError carries no error number
        no_space = free is not None and free < needed
    if not no_space:
        return None
    space = f"{_size(free)} free" if free is not None else "free space unknown"
    return (f"cannot write {path}: no space left on its file system ({space}, about {_size(needed)} needed); "
            "the previous file is kept")


def _read_only(folder: Path) -> bool:
    """Whether `folder` is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside `obj` (nested dicts and lists): about the size torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0
