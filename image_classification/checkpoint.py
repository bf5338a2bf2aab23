"""Training checkpoints: the reference's files and keys, plus what an exact resume needs, written atomically.

Keys: epoch (next epoch to run), best_prec1, state_dict, optimizer, state_dict_ema (with --use-ema) as the
reference; and scaler, rng, iteration (next batch of `epoch`, non-zero for a checkpoint taken mid-epoch by
SIGTERM), accumulated_iterations and accumulation (with gradients, per process, when the checkpoint falls
between the batches of an accumulated optimizer step), data_seed, epochs_without_improvement, arch, classes (the
class names in index order), args.
Everything is a tensor or a plain container, so files load with `weights_only=True`.

Files in the workspace, as the reference names them: <prefix><checkpoint-filename> (latest; quant_main.py's
prefix is quantized_), model_best.pth.tar (best val top-1) and, with --gather-checkpoints N, the last N of
checkpoint_<epoch:04>.pth.tar.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .cli import UserError
from .models.weights import WeightsError, first_non_finite, load_file

REQUIRED_KEYS = ("epoch", "best_prec1", "state_dict", "optimizer")
CLASS_NAMES_FILE = "classes.txt"


class CheckpointError(UserError):
    """A --resume file that is missing, unreadable or not a training checkpoint of this run."""


# --- atomic files -------------------------------------------------------------------------------------------

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
        raise CheckpointError(message) from None
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


# --- RNG state ------------------------------------------------------------------------------------------------

def capture_rng_state(ctx=None) -> dict:
    """torch (CPU and device), numpy and python RNG states as tensors and plain lists (weights_only-safe)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": [int(version), [int(x) for x in internal], gauss_next],
    }
    device_state = ctx.device_rng_state() if ctx is not None else None
    if device_state is not None:
        state["device"] = device_state
    return state


def restore_rng_state(state: dict, ctx=None) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if ctx is not None and "device" in state:
        ctx.set_device_rng_state(state["device"])


# --- accumulated gradients -----------------------------------------------------------------------------------

def capture_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients `model`'s parameters hold between two optimizer steps, by parameter name, on the CPU (so that
    every process's can be gathered into rank 0's checkpoint)."""
    return {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}


def restore_gradients(model: torch.nn.Module, gradients: Mapping[str, torch.Tensor]) -> None:
    """Inverse of `capture_gradients`: each gradient in its parameter's device and memory layout, as autograd
    would have left it, so that the next backward adds to it exactly as in the run that saved it."""
    for name, p in model.named_parameters():
        if name in gradients:
            p.grad = torch.empty_like(p).copy_(gradients[name])


# --- writing --------------------------------------------------------------------------------------------------

class CheckpointWriter:
    """Writes the workspace's checkpoint files (main process only; the caller checks)."""

    def __init__(self, workspace: str | Path, *, filename: str = "checkpoint.pth.tar", keep_last: int = 0):
        self.workspace = Path(workspace)
        self.latest = self.workspace / filename
        self.best = self.workspace / "model_best.pth.tar"
        self.keep_last = keep_last
        # Temporary files of a write killed before its rename (where O_TMPFILE is not available) are garbage.
        if self.workspace.is_dir():
            for pattern in (".*.pth.tar.*.tmp", f".{CLASS_NAMES_FILE}.*.tmp"):
                for stale in self.workspace.glob(pattern):
                    stale.unlink(missing_ok=True)

    def epoch_path(self, epoch: int) -> Path:
        return self.workspace / f"checkpoint_{epoch:04}.pth.tar"

    def save(self, state: dict, *, is_best: bool) -> Path:
        """Write the latest checkpoint, then copy it to the best and per-epoch files as asked.

        Weights with NaN or infinite values are refused (CheckpointError): a diverged run never replaces a
        finite checkpoint.
        """
        for key in ("state_dict", "state_dict_ema"):
            bad = first_non_finite(state.get(key) or {})
            if bad is not None:
                raise CheckpointError(f"not writing {self.latest}: {key} {bad} holds NaN or infinite values (the run "
                                      "diverged); the previous checkpoint is kept")
        atomic_save(state, self.latest)
        if is_best:
            atomic_copy(self.latest, self.best)
        if self.keep_last > 0 and state.get("iteration", 0) == 0:
            atomic_copy(self.latest, self.epoch_path(state["epoch"]))
            self._prune()
        return self.latest

    def _prune(self) -> None:
        for path in epoch_checkpoints(self.workspace)[:-self.keep_last]:
            path.unlink(missing_ok=True)


EPOCH_FILE = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")


def epoch_checkpoints(workspace: str | Path) -> list[Path]:
    """The workspace's per-epoch checkpoints (--gather-checkpoints), oldest epoch first."""
    found = [(int(m.group(1)), path) for path in Path(workspace).iterdir() if (m := EPOCH_FILE.match(path.name))]
    return [path for _, path in sorted(found)]


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically (as the checkpoints are written)."""
    data = text.encode("utf-8")
    _atomic_write(Path(path), lambda f: f.write(data), len(data))


def write_class_names(workspace: str | Path, classes: list[str]) -> None:
    """<workspace>/classes.txt, one class name per line in index order (classify.py --class-names reads it)."""
    data = "".join(f"{name}\n" for name in classes).encode("utf-8")
    _atomic_write(Path(workspace) / CLASS_NAMES_FILE, lambda f: f.write(data), len(data))


# --- reading --------------------------------------------------------------------------------------------------

def class_difference(classes: list[str], recorded: list[str]) -> str | None:
    """How `classes` differ from the `recorded` ones of a checkpoint (index order matters), in words; None if equal."""
    classes, recorded = list(classes), list(recorded)
    if classes == recorded:
        return None
    if len(classes) != len(recorded):
        return f"{len(classes)} classes, the checkpoint {len(recorded)}"
    index = next(i for i, (a, b) in enumerate(zip(classes, recorded)) if a != b)
    return f"class {index} is {classes[index]!r}, in the checkpoint {recorded[index]!r}"


def check_classes(saved: dict, path: str | Path, classes: list[str]) -> None:
    """Refuse to resume on data whose classes are not the checkpoint's, in its order (class i must stay class i).

    Another number of classes is left to the model's check, which names the --num_classes to resume with;
    checkpoints written before class names were recorded are not checked.
    """
    recorded = saved.get("classes")
    if recorded is None or len(recorded) != len(classes):
        return
    difference = class_difference(classes, recorded)
    if difference is not None:
        raise CheckpointError(f"--resume {path}: the data's classes are not those the checkpoint was trained on "
                              f"({difference}); resume on the data it was trained on")


def load_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint for --resume (weights_only), or raise CheckpointError saying what is wrong."""
    try:
        state = load_file(path)
    except WeightsError as err:
        raise CheckpointError(f"--resume {err}") from None
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"--resume {path}: not a training checkpoint (missing {', '.join(missing)}); "
                              "to start from plain weights use --pretrained-from-file")
    return state
