"""Checkpoint averaging (scripts/average_checkpoints.py) and BatchNorm statistics recomputed for averaged weights.

    python scripts/average_checkpoints.py --workspace ws --last 5 --output ws/averaged.pth.tar
    python scripts/average_checkpoints.py ws/checkpoint_0098.pth.tar ws/checkpoint_0099.pth.tar \\
        ws/checkpoint_0100.pth.tar --output averaged.pth.tar --recompute-bn 200 --data /imagenet

Floating tensors are averaged (summed in float64, then cast back to their dtype); integer and bool tensors
(BatchNorm's num_batches_tracked) are the last checkpoint's. The output is a training checkpoint as the suite
writes it (epoch, best_prec1, arch and args of the last input, the averaged state_dict and, when every input has
one, the averaged state_dict_ema), with an empty optimizer state: it loads with --pretrained-from-file,
--evaluate --resume, classify.py and checkpoint2model.py. The running BN statistics of averaged weights are
the average of statistics that belonged to other weights; --recompute-bn K measures them afresh over K
training batches, as SWA's update_bn does at the end of a run.
"""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..atomic import atomic_save
from ..cli import ArgumentParser, Number, UserError, run_cli
from ..context import ExecutionContext, create_context
from ..data import FILE_BACKENDS
from ..models.weights import first_non_finite, fit_state_dict, load_file, remap_reference_keys

PROG = "average_checkpoints.py"
WEIGHT_KEYS = ("state_dict", ckpt.EMA_KEY)


class AveragingError(UserError):
    """Checkpoints that cannot be averaged together; the message names the file."""


# --- averaging --------------------------------------------------------------------------------------------------

def _mismatch(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> str | None:
    """What differs between two state dicts' keys, shapes and dtypes, in words; None when they match."""
    missing = [k for k in reference if k not in other]
    unexpected = [k for k in other if k not in reference]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        return "keys differ: " + "; ".join(parts)
    for key, tensor in reference.items():
        if other[key].shape != tensor.shape:
            return f"shape of {key} is {list(other[key].shape)}, not {list(tensor.shape)}"
        if other[key].dtype != tensor.dtype:
            return f"dtype of {key} is {other[key].dtype}, not {tensor.dtype}"
    return None


def average_state_dicts(named: Sequence[tuple[str, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the floating tensors of (source, state dict) pairs; other tensors from the last.

    Refuses (AveragingError naming the source) a state dict whose keys, shapes or dtypes differ from the first's.
    """
    if not named:
        raise AveragingError("no checkpoints to average")
    first_source, first = named[0]
    for source, state_dict in named[1:]:
        problem = _mismatch(first, state_dict)
        if problem is not None:
            raise AveragingError(f"{source} does not match {first_source}: {problem}")
    last = named[-1][1]
    averaged = {}
    for key, tensor in first.items():
        if tensor.is_floating_point():
            total = sum(state_dict[key].double() for _, state_dict in named)
            averaged[key] = (total / len(named)).to(tensor.dtype)
        else:
            averaged[key] = last[key].clone()
    return averaged


def _weights(checkpoint: dict, key: str, source: str) -> dict[str, torch.Tensor] | None:
    """The `key` weights of a file's dict (a plain state dict counts as its state_dict), `module.` stripped."""
    ema = key == ckpt.EMA_KEY
    if ema and checkpoint.get(key) is None:
        return None
    return remap_reference_keys(ckpt.Checkpoint.weights_of(checkpoint, ema=ema, source=source))


def average_checkpoints(paths: Sequence[str | Path]) -> ckpt.Checkpoint:
    """A training checkpoint whose weights (and EMA weights) are the mean of those in `paths`."""
    loaded = [(str(path), load_file(path)) for path in paths]
    out: dict = {}
    for key in WEIGHT_KEYS:
        named = [(source, _weights(checkpoint, key, source)) for source, checkpoint in loaded]
        present = [source for source, weights in named if weights is not None]
        if not present:
            continue
        if len(present) != len(named):
            lacking = next(source for source, weights in named if weights is None)
            raise AveragingError(f"{lacking} has no {key}, {present[0]} has: average checkpoints of one run")
        out[key] = average_state_dicts(named)
    last = ckpt.Checkpoint.from_dict(loaded[-1][1])
    extras = {ckpt.EMA_KEY: out[ckpt.EMA_KEY]} if ckpt.EMA_KEY in out else {}
    # Moments of the last weights mean nothing for their average (no optimizer state): --resume from this file
    # trains afresh.
    return ckpt.Checkpoint(epoch=int(last.epoch), best_prec1=float(last.best_prec1), state_dict=out["state_dict"],
                           extras={**extras, "averaged_from": [source for source, _ in loaded]}, arch=last.arch,
                           classes=last.classes, args=last.args)


def last_epoch_checkpoints(workspace: str | Path, last: int) -> list[Path]:
    """The `last` newest per-epoch checkpoints of a workspace, oldest first."""
    workspace = Path(workspace)
    if not workspace.is_dir():
        raise AveragingError(f"--workspace {workspace}: no such folder")
    found = ckpt.epoch_checkpoints(workspace)
    if len(found) < last:
        raise AveragingError(f"--workspace {workspace} has {len(found)} per-epoch checkpoints "
                             f"(checkpoint_<epoch>.pth.tar), --last asks for {last}; train with "
                             f"--gather-checkpoints {last} to keep them")
    return found[-last:]


# --- BatchNorm statistics ---------------------------------------------------------------------------------------

def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recompute_bn(model: nn.Module, batches: Iterable, ctx: ExecutionContext) -> None:
    """Reset the BN running statistics of `model` and measure them as their plain mean over `batches` (torch's
    update_bn: momentum None), each an (images, labels) batch already on ctx's device."""
    with ctx.autocast():
        torch.optim.swa_utils.update_bn(batches, model)


def recompute_bn_of_checkpoint(checkpoint: ckpt.Checkpoint, data: str, batches: int, *, data_backend: str,
                               batch_size: int | None, workers: int, device: str | None) -> None:
    """Recompute the BN statistics of the checkpoint's weights (and EMA weights) over `batches` training batches
    of `data`, with the training pipeline of the run that wrote it (its image size, interpolation, augmentation)."""
    from ..data import build_train_loader
    from ..models import get_entry
    run = checkpoint.args
    if not run or checkpoint.arch is None:
        raise AveragingError("--recompute-bn needs the run's training checkpoints (their arch and flags say which "
                             "model and training pipeline); these are plain state dicts")
    entry = get_entry(checkpoint.arch)
    model_args = {k: v for k, v in run.get("model_args", {}).items()
                  if k not in ("pretrained", "pretrained_from_file", "reset_classifier")}
    ctx = create_context(device=device)
    model = entry(**model_args).to(ctx.device, memory_format=ctx.memory_format)
    if not has_batchnorm(model):
        raise AveragingError(f"--recompute-bn: {checkpoint.arch} has no BatchNorm layers")
    loader = build_train_loader(data_backend, data, image_size=run.get("image_size") or entry.default_image_size,
                                batch_size=batch_size or run.get("batch_size", 32), ctx=ctx,
                                num_classes=model_args.get("num_classes", 1000), workers=workers,
                                interpolation=run.get("interpolation", "bilinear"),
                                augmentation=run.get("augmentation"), seed=run.get("seed") or 0,
                                **entry.preprocessing.normalization)
    try:
        if batches > len(loader):
            raise AveragingError(f"--recompute-bn {batches}: {data} has {len(loader)} training batches of "
                                 f"{loader.batch_size}")
        for key, weights in _weight_sets(checkpoint):
            model.load_state_dict(fit_state_dict(model, weights, source=f"the averaged {key}"))
            loader.set_epoch(0)
            recompute_bn(model, itertools.islice(loader, batches), ctx)
            recomputed = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
            if key == ckpt.EMA_KEY:
                checkpoint.extras[key] = recomputed
            else:
                checkpoint.state_dict = recomputed
    finally:
        loader.close()


# --- command line -----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Average the weights of several checkpoints of one run "
                                              "(floating tensors averaged, integer buffers from the last).")
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="checkpoint files, oldest first")
    p.add_argument("--workspace", default=None, metavar="DIR",
                   help="take the run's per-epoch checkpoints (checkpoint_<epoch>.pth.tar, --gather-checkpoints) "
                        "from this folder instead of CKPT files; needs --last")
    p.add_argument("--last", type=Number(int, low=1), default=None, metavar="N",
                   help="with --workspace: average its N newest per-epoch checkpoints")
    p.add_argument("--output", required=True, metavar="OUT", help="the averaged checkpoint to write (atomically)")
    g = p.add_argument_group("BatchNorm statistics")
    g.add_argument("--recompute-bn", type=Number(int, low=1), default=None, metavar="K",
                   help="recompute BN running statistics over K training batches of --data (default: keep the "
                        "average of the inputs' statistics)")
    g.add_argument("--data", default=None, metavar="DIR", help="dataset folder (train/<class>/*) for --recompute-bn")
    g.add_argument("--data-backend", default="pytorch", choices=FILE_BACKENDS,
                   help="input pipeline for --recompute-bn (default: %(default)s)")
    g.add_argument("-b", "--batch-size", type=Number(int, low=1), default=None, metavar="N",
                   help="batch size for --recompute-bn (default: the run's --batch-size)")
    g.add_argument("-j", "--workers", type=Number(int, low=0), default=2, metavar="N",
                   help="data loading workers for --recompute-bn (default: %(default)s)")
    g.add_argument("--device", default=None, metavar="cpu|cuda[:N]",
                   help="where --recompute-bn runs (default: CUDA when present, else CPU)")
    return p


def input_paths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Path]:
    """The files to average that the flags name (explicit files, or the workspace's last N)."""
    if args.workspace is not None:
        if args.checkpoints:
            parser.error("give CKPT files or --workspace DIR --last N, not both")
        if args.last is None:
            parser.error("--workspace needs --last N (how many of its newest per-epoch checkpoints)")
        return last_epoch_checkpoints(args.workspace, args.last)
    if args.last is not None:
        parser.error("--last needs --workspace DIR")
    if len(args.checkpoints) < 2:
        parser.error("give at least two CKPT files, or --workspace DIR --last N")
    return [Path(path) for path in args.checkpoints]


def _weight_sets(checkpoint: ckpt.Checkpoint) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(key, weights) of the checkpoint's weights and, when it has them, its EMA weights."""
    ema = checkpoint.state_dict_ema
    return [("state_dict", checkpoint.state_dict)] + ([(ckpt.EMA_KEY, ema)] if ema is not None else [])


def run(args: argparse.Namespace, paths: Sequence[Path]) -> ckpt.Checkpoint:
    """Average, recompute BN statistics when asked, write the output; returns the written checkpoint."""
    checkpoint = average_checkpoints(paths)
    if args.recompute_bn is not None:
        recompute_bn_of_checkpoint(checkpoint, args.data, args.recompute_bn, data_backend=args.data_backend,
                                   batch_size=args.batch_size, workers=args.workers, device=args.device)
    for key, weights in _weight_sets(checkpoint):
        bad = first_non_finite(weights)
        if bad is not None:
            raise AveragingError(f"not writing {args.output}: {key} {bad} holds NaN or infinite values")
    atomic_save(checkpoint.to_dict(), args.output)
    return checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    """average_checkpoints.py: write the average of the checkpoints named; bad input is one line, status 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.recompute_bn is None) != (args.data is None):
        parser.error("--recompute-bn K and --data DIR go together")
    paths = run_cli(PROG, input_paths, args, parser)
    checkpoint = run_cli(PROG, run, args, paths)
    print(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) into {args.output}"
          + (f"; BN statistics recomputed over {args.recompute_bn} batches of {args.data}"
             if args.recompute_bn is not None else ""))
    if checkpoint.state_dict_ema is not None:
        print("the EMA weights (state_dict_ema) were averaged too")
    return 0
