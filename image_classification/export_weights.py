"""checkpoint2model.py: write the weights of a training checkpoint as a plain state dict."""
from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoint import atomic_save
from .cli import ArgumentParser, run_cli
from .models.weights import extract_state_dict, load_file, remap_reference_keys

PROG = "checkpoint2model.py"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Extract model weights from a training checkpoint")
    p.add_argument("--checkpoint-path", required=True, metavar="CKPT", help="training checkpoint (.pth.tar)")
    p.add_argument("--weight-path", required=True, metavar="OUT", help="where to write the state dict")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (state_dict_ema) instead of the raw ones")
    return p


def checkpoint_to_weights(checkpoint_path: str | Path, weight_path: str | Path, ema: bool = False) -> dict:
    """Write the (EMA) state dict of `checkpoint_path`, without `module.` prefixes; return the checkpoint."""
    checkpoint = load_file(checkpoint_path)
    state_dict = remap_reference_keys(extract_state_dict(checkpoint, ema=ema, source=str(checkpoint_path)))
    atomic_save(state_dict, weight_path)
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    """checkpoint2model.py: write the weights, print the checkpoint's best top-1; bad input is one line, status 1."""
    args = build_parser().parse_args(argv)
    checkpoint = run_cli(PROG, checkpoint_to_weights, args.checkpoint_path, args.weight_path, ema=args.ema)
    print(f"{'EMA ' if args.ema else ''}weights written to {args.weight_path}")
    print(f"best_prec1: {checkpoint.get('best_prec1', 'unknown')}")
    return 0
