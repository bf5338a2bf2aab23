#!/usr/bin/env python3
"""Train or evaluate an image classifier with the NVIDIA ConvNets command line (see `python main.py -h`).

    python main.py /imagenet --arch efficientnet-b0 --epochs 400 -b 256 --amp --lr 0.08 ...
    python main.py --config ws/config.yaml --workspace ws2         # repeat a run from the flags it wrote
    python multiproc.py --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...
    torchrun --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...

Exit status: 0 done, 1 bad input (one line on stderr), 2 bad command line, 75 stopped by SIGTERM/SIGINT with
a checkpoint saved (continue with --resume). Installed with `pip install -e .`, the same is `efficientnet-train`.
"""
from image_classification.cli import exit_status
from image_classification.commands import train_main as main

__all__ = ["exit_status", "main"]

if __name__ == "__main__":
    raise SystemExit(exit_status(main()))
