"""Training checkpoints: the reference's files and keys, plus what an exact resume needs, written atomically
(atomic.py).

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

import pickle
import random
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_copy, atomic_save, atomic_write_text
from .cli import UserError

REQUIRED_KEYS = ("epoch", "best_prec1", "state_dict", "optimizer")
EMA_KEY = "state_dict_ema"
# Entries every process of a run contributes (a list in rank order when several did).
PER_RANK_KEYS = ("rng", "loader", "epoch_meter", "gradients")
CLASS_NAMES_FILE = "classes.txt"


class CheckpointError(UserError):
    """A --resume file that is missing, unreadable or not a training checkpoint of this run."""


class WeightsError(UserError):
    """Weights that cannot be read or do not fit the model; the message says what and where."""


# --- the format -------------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A training checkpoint. `to_dict()` is what the file holds: the reference's keys first (epoch, best_prec1,
    state_dict, optimizer, then state_dict_ema among the extras), then what an exact resume needs; `from_dict`
    reads any file this suite or the reference wrote, absent keys taking their defaults.

    `extras` are the entries that training features and tools keep under their own keys, in order: state_dict_ema
    (EMA weights), swa, teacher, and tools' notes such as averaged_from. `per_rank` holds PER_RANK_KEYS.
    """

    epoch: int = 0                   # the next epoch to run
    best_prec1: float = 0.0
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    iteration: int = 0               # the next batch of `epoch`: non-zero for a checkpoint taken mid-epoch
    validated: bool | None = None    # whether best_prec1 comes from a validation (None: older files, epoch > 0)
    optimizer_steps: int = 0
    accumulated_iterations: int = 0  # iterations whose gradients (per_rank "gradients") wait for the next step
    accumulation: int = 1
    epochs_without_improvement: int = 0
    data_seed: int | None = None
    history: list = field(default_factory=list)
    world_size: int = 1
    arch: str | None = None
    classes: list[str] | None = None
    args: dict = field(default_factory=dict)
    per_rank: dict[str, Any] = field(default_factory=dict)

    # The suite's keys after the reference's and the extras, in the file's order.
    _SUITE_KEYS = ("scaler", "iteration", "validated", "optimizer_steps", "accumulated_iterations", "accumulation",
                   "epochs_without_improvement", "data_seed", "history", "world_size", "arch", "classes", "args")

    def to_dict(self) -> dict[str, Any]:
        """The file's dict (tensors and plain containers only, so that it loads with weights_only=True)."""
        out = {"epoch": self.epoch, "best_prec1": self.best_prec1, "state_dict": self.state_dict,
               "optimizer": self.optimizer, **self.extras}
        out.update((key, getattr(self, key)) for key in self._SUITE_KEYS if getattr(self, key) is not None)
        out.update(self.per_rank)
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "Checkpoint":
        """A checkpoint from a file's dict; keys of neither the reference nor the suite are kept as extras."""
        known = {*REQUIRED_KEYS, *cls._SUITE_KEYS}
        fields_ = {key: obj[key] for key in known if key in obj}
        return cls(**fields_, extras={k: v for k, v in obj.items() if k not in known and k not in PER_RANK_KEYS},
                   per_rank={k: obj[k] for k in PER_RANK_KEYS if k in obj})

    @property
    def state_dict_ema(self) -> dict[str, torch.Tensor] | None:
        return self.extras.get(EMA_KEY)

    def this_rank(self, key: str, rank: int, world_size: int) -> Any:
        """Process `rank`'s value of a per-rank entry, or None when the checkpoint lacks it or was written by another
        number of processes."""
        value = self.per_rank.get(key)
        if value is None or self.world_size != world_size:
            return None
        return value[rank] if isinstance(value, list) else value

    @staticmethod
    def weights_of(obj: Mapping, ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
        """The model weights a file holds: a training checkpoint's state_dict (its EMA weights with `ema`), or the
        file itself when it is a plain state dict."""
        if ema:
            if obj.get(EMA_KEY) is None:
                raise WeightsError(f"{source}: has no EMA weights ({EMA_KEY}); it was trained without --use-ema")
            obj = obj[EMA_KEY]
        elif "state_dict" in obj:
            obj = obj["state_dict"]
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise WeightsError(f"{source}: holds no tensors; keys are {sorted(obj)[:10]}")
        return tensors


# --- reading files ------------------------------------------------------------------------------------------------

def load_file(path: str | Path) -> dict:
    """Load a checkpoint or state dict with `weights_only=True` (tensors and plain containers only), or a
    `.safetensors` state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{path}: refused to load, it holds objects other than tensors and plain containers "
                           f"(only weights_only=True files are accepted): {str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else 'truncated file'})") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict or a training checkpoint, found {type(obj).__name__}")
    return dict(obj)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors
    try:
        return load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


def first_non_finite(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, or None when all are finite."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


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

    def save(self, checkpoint: Checkpoint, *, is_best: bool) -> Path:
        """Write the latest checkpoint, then copy it to the best and per-epoch files as asked.

        Weights with NaN or infinite values are refused (CheckpointError): a diverged run never replaces a
        finite checkpoint.
        """
        for key, weights in (("state_dict", checkpoint.state_dict), (EMA_KEY, checkpoint.state_dict_ema)):
            bad = first_non_finite(weights or {})
            if bad is not None:
                raise CheckpointError(f"not writing {self.latest}: {key} {bad} holds NaN or infinite values (the run "
                                      "diverged); the previous checkpoint is kept")
        atomic_save(checkpoint.to_dict(), self.latest)
        if is_best:
            atomic_copy(self.latest, self.best)
        if self.keep_last > 0 and checkpoint.iteration == 0:
            atomic_copy(self.latest, self.epoch_path(checkpoint.epoch))
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


def write_class_names(workspace: str | Path, classes: list[str]) -> None:
    """<workspace>/classes.txt, one class name per line in index order (classify.py --class-names reads it)."""
    atomic_write_text(Path(workspace) / CLASS_NAMES_FILE, "".join(f"{name}\n" for name in classes))


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


def check_classes(saved: Checkpoint, path: str | Path, classes: list[str]) -> None:
    """Refuse to resume on data whose classes are not the checkpoint's, in its order (class i must stay class i).

    Another number of classes is left to the model's check, which names the --num_classes to resume with;
    checkpoints written before class names were recorded are not checked.
    """
    recorded = saved.classes
    if recorded is None or len(recorded) != len(classes):
        return
    difference = class_difference(classes, recorded)
    if difference is not None:
        raise CheckpointError(f"--resume {path}: the data's classes are not those the checkpoint was trained on "
                              f"({difference}); resume on the data it was trained on")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a training checkpoint for --resume (weights_only), or raise CheckpointError saying what is wrong."""
    try:
        state = load_file(path)
    except WeightsError as err:
        raise CheckpointError(f"--resume {err}") from None
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"--resume {path}: not a training checkpoint (missing {', '.join(missing)}); "
                              "to start from plain weights use --pretrained-from-file")
    return Checkpoint.from_dict(state)
