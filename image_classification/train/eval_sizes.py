"""scripts/eval_sizes.py: one model validated at several evaluation sizes and crop fractions (the FixRes sweep).

    python scripts/eval_sizes.py /imagenet --arch efficientnet-b0 --pretrained-from-file ws/model_best.pth.tar \\
        --sizes 224 256 288 320 --crop-pcts 0.875 1.0

A network trained at S often scores better evaluated somewhat larger (Touvron et al., "Fixing the train-test
resolution discrepancy"): training's random-resized crops show objects larger than validation's centre crop
does. Each row is one validation pass, the geometry of main.py's --eval-image-size S --eval-crop-pct P (short
side to round(S/P), centre crop S); without --crop-pcts the reference's resize to S+32, whose crop fraction
S/(S+32) the table shows. img/s is the compute speed (val.compute_ips: model time only, first batch left out).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from itertools import product

from ..cli import ArgumentParser, Number, run_cli
from ..context import create_context
from ..data import FILE_BACKENDS, INTERPOLATIONS
from ..models import available_models, get_entry, parse_model_flags
from ..toolkit.tta import TTA_MODES

PROG = "eval_sizes.py"
COLUMNS = ("size", "crop pct", "top1", "top5", "img/s")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False,
                       description="Validate one model at several evaluation sizes and crop fractions (the arch's "
                                   "model flags, e.g. --pretrained-from-file and --num_classes, are accepted too).")
    p.add_argument("-h", "--help", action="store_true", help="show this help (and the model flags) and exit")
    p.add_argument("data", metavar="DIR", help="dataset folder with val/<class>/*")
    p.add_argument("-a", "--arch", required=True, metavar="ARCH",
                   help="model architecture, one of: " + ", ".join(sorted(available_models())))
    p.add_argument("--sizes", type=Number(int, low=1), nargs="+", required=True, metavar="S",
                   help="evaluation image sizes (main.py's --eval-image-size)")
    p.add_argument("--crop-pcts", type=Number(float, low=0, high=1, low_open=True), nargs="+", default=[None],
                   metavar="P", help="crop fractions (main.py's --eval-crop-pct); every size is evaluated with each "
                                     "(default: the reference's resize to S+32)")
    p.add_argument("--data-backend", default="pytorch", choices=FILE_BACKENDS,
                   help="input pipeline (default: %(default)s)")
    p.add_argument("--interpolation", default=None, choices=INTERPOLATIONS,
                   help="resize interpolation (default: the arch's: bilinear for B0-B7, bicubic for "
                        "efficientnet-lite*)")
    p.add_argument("-b", "--batch-size", type=Number(int, low=1), default=64, metavar="N",
                   help="batch size (default: %(default)s)")
    p.add_argument("-j", "--workers", type=Number(int, low=0), default=4, metavar="N",
                   help="data loading workers (default: %(default)s)")
    p.add_argument("--prof", type=Number(int, low=1, off=-1), default=-1, metavar="N",
                   help="validate only the first N batches at each size (default: all)")
    p.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="test-time augmentation: flip averages the softmax of each image and of its mirror "
                        "(default: %(default)s)")
    p.add_argument("--amp", action="store_true", help="mixed precision: fp16 autocast on GPU, bf16 on CPU")
    p.add_argument("--memory-format", default="nchw", choices=("nchw", "nhwc"),
                   help="tensor layout (default: %(default)s)")
    p.add_argument("--device", default=None, metavar="cpu|cuda[:N]",
                   help="where to run (default: CUDA when present, else CPU)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The script's flags, then the arch's model flags into args.model_args; unknown flags are an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        probe = ArgumentParser(add_help=False)
        probe.add_argument("-a", "--arch")
        arch = probe.parse_known_args(argv)[0].arch
        if arch in available_models():
            print(f"\nmodel flags of {arch}:")
            print(get_entry(arch).parser().format_help())
        raise SystemExit(0)
    args, rest = parser.parse_known_args(argv)
    parse_model_flags(parser, args, rest, PROG)
    return args


def crop_fraction(size: int, crop_pct: float | None) -> float:
    """The crop fraction the validation geometry of (size, --eval-crop-pct) uses."""
    return crop_pct if crop_pct is not None else size / (size + 32)


def evaluate_sizes(args: argparse.Namespace) -> list[tuple[int, float, float, float, float]]:
    """(size, crop pct, top1, top5, img/s) of every size x crop fraction, in the order given."""
    from ..data import build_val_loader
    from ..logger import Logger
    from .validate import EvalOptions, validate
    entry = get_entry(args.arch)
    ctx = create_context(device=args.device, amp=args.amp, memory_format=args.memory_format)
    model = entry(**vars(args.model_args)).to(ctx.device, memory_format=ctx.memory_format)
    if not (getattr(args.model_args, "pretrained", False) or args.model_args.pretrained_from_file):
        print(f"{PROG}: warning: {args.arch} has random weights (no --pretrained or --pretrained-from-file)",
              file=sys.stderr)
    options = EvalOptions(prof=args.prof, topk=5, print_freq=sys.maxsize, tta=args.tta)
    rows = []
    settings = list(product(args.sizes, args.crop_pcts))
    for number, (size, crop_pct) in enumerate(settings, start=1):
        loader = build_val_loader(args.data_backend, args.data, image_size=size, crop_pct=crop_pct,
                                  batch_size=args.batch_size, ctx=ctx, num_classes=args.model_args.num_classes,
                                  workers=args.workers, seed=0,
                                  interpolation=args.interpolation or entry.preprocessing.interpolation,
                                  **entry.preprocessing.normalization)
        try:
            record = validate(model, loader, ctx, Logger(None, enabled=False), options)
        finally:
            loader.close()
        rows.append((size, crop_fraction(size, crop_pct), record["val.top1"], record["val.top5"],
                     record["val.compute_ips"]))
        # The table comes at the end; a sweep of large sizes takes minutes, so each row is announced as it is done.
        print(f"{PROG}: {number}/{len(settings)}: size {size}, crop pct {rows[-1][1]:.3f}: top1 {rows[-1][2]:.2f}",
              file=sys.stderr, flush=True)
    return rows


def format_table(rows: Sequence[tuple[int, float, float, float, float]]) -> str:
    """A markdown table, one row per (size, crop pct)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for size, crop_pct, top1, top5, speed in rows:
        lines.append(f"| {size} | {crop_pct:.3f} | {top1:.2f} | {top5:.2f} | {speed:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """eval_sizes.py: print the table; bad input is one line on stderr, status 1."""
    args = parse_args(argv)
    print(format_table(run_cli(PROG, evaluate_sizes, args)))
    return 0
