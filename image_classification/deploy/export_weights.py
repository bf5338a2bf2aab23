"""checkpoint2model.py: write the weights of a training checkpoint as a plain state dict (.pth or .safetensors)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import atomic_save, atomic_save_safetensors
from ..checkpoint import Checkpoint, load_file
from ..cli import ArgumentParser, run_cli
from ..models.weights import remap_reference_keys

PROG = "checkpoint2model.py"
FORMATS = ("pth", "safetensors")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Extract model weights from a training checkpoint")
    p.add_argument("--checkpoint-path", required=True, metavar="CKPT", help="training checkpoint (.pth.tar)")
    p.add_argument("--weight-path", required=True, metavar="OUT", help="where to write the state dict")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (state_dict_ema) instead of the raw ones")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="pth (torch.save, as the reference) or safetensors (tensors only, readable without "
                        "PyTorch's pickle); default: safetensors when OUT ends in .safetensors, else pth "
                        "(not in the reference)")
    return p


def checkpoint_to_weights(checkpoint_path: str | Path, weight_path: str | Path, ema: bool = False,
                          weight_format: str | None = None) -> dict:
    """Write the (EMA) state dict of `checkpoint_path`, without `module.` prefixes; return the file's dict."""
    saved = load_file(checkpoint_path)
    state_dict = remap_reference_keys(Checkpoint.weights_of(saved, ema=ema, source=str(checkpoint_path)))
    if weight_format is None:
        weight_format = "safetensors" if str(weight_path).endswith(".safetensors") else "pth"
    save = atomic_save_safetensors if weight_format == "safetensors" else atomic_save
    save(state_dict, weight_path)
    return saved


def main(argv: list[str] | None = None) -> int:
    """checkpoint2model.py: write the weights, print the checkpoint's best top-1; bad input is one line, status 1."""
    args = build_parser().parse_args(argv)
    checkpoint = run_cli(PROG, checkpoint_to_weights, args.checkpoint_path, args.weight_path, ema=args.ema,
                         weight_format=args.format)
    print(f"{'EMA ' if args.ema else ''}weights written to {args.weight_path}")
    print(f"best_prec1: {checkpoint.get('best_prec1', 'unknown')}")
    return 0
