"""Training checkpoints: the reference's files and keys, plus what an exact resume needs, written atomically.

Keys: epoch (next epoch to run), best_prec1, state_dict, optimizer, state_dict_ema (with --use-ema) as the
reference; and scaler, rng, iteration (next batch of `epoch`, non-zero for a checkpoint taken mid-epoch by
SIGTERM), data_seed, epochs_without_improvement, arch, args. Everything is a tensor or a plain container,
so files load with `weights_only=True`.

Files in the workspace: <prefix><checkpoint-filename> (latest), <prefix>model_best.pth.tar (best val top-1)
and, with --gather-checkpoints N, the last N of <prefix>checkpoint_<epoch:04>.pth.tar.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models.weights import WeightsError, load_file

REQUIRED_KEYS = ("epoch", "best_prec1", "state_dict", "optimizer")


class CheckpointError(ValueError):
    """A --resume file that is missing, unreadable or not a training checkpoint of this run."""


# --- atomic files -------------------------------------------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # Make the rename itself durable.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file next to `path`, then rename."""
    _atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy `src` to `dst` through a temporary file and a rename."""
    _atomic_write(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


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


# --- args -----------------------------------------------------------------------------------------------------

def plain_args(args: argparse.Namespace) -> dict:
    """The run's flags as a dict of plain values (nested Namespaces become dicts)."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, argparse.Namespace):
            out[key] = plain_args(value)
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            out[key] = list(value)
        else:
            out[key] = str(value)
    return out


# --- writing --------------------------------------------------------------------------------------------------

class CheckpointWriter:
    """Writes the workspace's checkpoint files (main process only; the caller checks)."""

    def __init__(self, workspace: str | Path, *, prefix: str = "", filename: str = "checkpoint.pth.tar",
                 keep_last: int = 0):
        self.workspace = Path(workspace)
        self.prefix = prefix
        self.latest = self.workspace / f"{prefix}{filename}"
        self.best = self.workspace / f"{prefix}model_best.pth.tar"
        self.keep_last = keep_last
        # Temporary files of a write that was killed before its rename are garbage.
        if self.workspace.is_dir():
            for stale in self.workspace.glob(f".{prefix}*.pth.tar.*.tmp"):
                stale.unlink(missing_ok=True)

    def epoch_path(self, epoch: int) -> Path:
        return self.workspace / f"{self.prefix}checkpoint_{epoch:04}.pth.tar"

    def save(self, state: dict, *, is_best: bool) -> Path:
        """Write the latest checkpoint, then copy it to the best and per-epoch files as asked."""
        atomic_save(state, self.latest)
        if is_best:
            atomic_copy(self.latest, self.best)
        if self.keep_last > 0 and state.get("iteration", 0) == 0:
            atomic_copy(self.latest, self.epoch_path(state["epoch"]))
            self._prune()
        return self.latest

    def _prune(self) -> None:
        pattern = re.compile(re.escape(self.prefix) + r"checkpoint_(\d{4,})\.pth\.tar$")
        epochs = sorted(int(m.group(1)) for p in self.workspace.iterdir() if (m := pattern.match(p.name)))
        for epoch in epochs[:-self.keep_last]:
            self.epoch_path(epoch).unlink(missing_ok=True)


def write_class_names(workspace: str | Path, classes: list[str]) -> None:
    """<workspace>/classes.txt, one class name per line in index order (classify.py --class-names reads it)."""
    path = Path(workspace) / "classes.txt"
    text = "".join(f"{name}\n" for name in classes)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# --- reading --------------------------------------------------------------------------------------------------

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
