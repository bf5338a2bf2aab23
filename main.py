#!/usr/bin/env python3
"""Train or evaluate an image classifier with the NVIDIA ConvNets command line (see `python main.py -h`).

    python main.py /imagenet --arch efficientnet-b0 --epochs 400 -b 256 --amp --lr 0.08 ...
    python multiproc.py --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...
    torchrun --nproc_per_node 8 main.py /imagenet --arch efficientnet-b0 ...
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags and run the job; bad input becomes one error line and exit status 1."""
    from image_classification.arguments import parse_args
    from image_classification.training import main as run
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not _is_user_error(err):
            raise
        print(f"main.py: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def _is_user_error(err: RuntimeError) -> bool:
    # Device requests that cannot be met (e.g. --device cuda without a GPU) are input errors, not crashes.
    return "--device" in str(err) or "--gpu-affinity" in str(err)


if __name__ == "__main__":
    main()
