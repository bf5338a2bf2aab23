#!/usr/bin/env python3
"""Quantization-aware training of efficientnet-quant-*: main.py's flags, plus calibration before training.

Float weights in, INT8 fake-quantized (Model Optimizer) training; the latest checkpoint is quantized_<name>,
the best model_best.pth.tar, as the reference names them:

    python quant_main.py /imagenet --arch efficientnet-quant-b0 --pretrained-from-file b0.pth \\
        --epochs 10 --optimizer sgd -b 128 --lr 0.0125 --lr-schedule cosine
    python quant_main.py /imagenet --arch efficientnet-quant-b0 --pretrained --evaluate    # NGC QAT weights

Calibration (--calibration-batches training batches, --calibrator histogram|max|percentile) runs
unless --resume, --evaluate or --skip-calibration; those take the ranges from the loaded weights.
"""
from __future__ import annotations

import argparse
import sys

from image_classification.cli import ArgumentParser, check_numbers, exit_status, run_cli
from image_classification.toolkit.quantization import add_arguments

CHECKPOINT_PREFIX = "quantized_"  # the reference's name of quant_main.py's latest checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """main.py's arguments (and the arch's model flags) together with the quantization flags."""
    from image_classification.arguments import parse_args as parse_main_args
    argv = list(sys.argv[1:] if argv is None else argv)
    quant_parser = add_arguments(ArgumentParser(prog="quant_main.py", add_help=False, allow_abbrev=False))
    if "-h" in argv or "--help" in argv:
        quant_parser.print_help()
        print()
    quant_args, rest = quant_parser.parse_known_args(argv)
    check_numbers(quant_args, quant_parser)
    args = parse_main_args(rest, prog="quant_main.py")
    for name, value in vars(quant_args).items():
        setattr(args, name, value)
    return args


def parse_config(argv: list[str] | None = None):
    """The job's Config: main.py's and the quantization flags, with quantized_-prefixed checkpoints."""
    from image_classification.config import Config
    return Config.from_args(parse_args(argv), checkpoint_prefix=CHECKPOINT_PREFIX)


def main(argv: list[str] | None = None) -> dict:
    """Parse, then train/evaluate with calibration as the train package's prepare_model step."""
    from image_classification.toolkit.quantization import calibration_hook
    from image_classification.train import run
    return run_cli("quant_main.py", lambda: run(parse_config(argv), prepare_model=calibration_hook))


if __name__ == "__main__":
    raise SystemExit(exit_status(main()))
