#!/usr/bin/env python3
"""Train or evaluate an image classifier with the NVIDIA ConvNets command line (see `python main.py -h`).

    python main.py /imagenet --arch efficientnet-b0 --epochs 400 -b 256 --amp --lr 0.08 ...
    python multiproc.py --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...
    torchrun --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...

Exit status: 0 done, 1 bad input (one line on stderr), 2 bad command line, 75 stopped by SIGTERM/SIGINT with
a checkpoint saved (continue with --resume).
"""
from __future__ import annotations

from image_classification.cli import exit_status, run_cli


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags and run the job; bad input becomes one error line and exit status 1."""
    from image_classification.arguments import parse_config
    from image_classification.train import run
    return run_cli("main.py", lambda: run(parse_config(argv)))


if __name__ == "__main__":
    raise SystemExit(exit_status(main()))
