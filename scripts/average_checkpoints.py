#!/usr/bin/env python3
"""Average the weights of several checkpoints of one run (see image_classification/averaging.py).

    .venv/bin/python scripts/average_checkpoints.py --workspace ws --last 5 --output ws/averaged.pth.tar
    .venv/bin/python scripts/average_checkpoints.py ws/checkpoint_0009.pth.tar ws/checkpoint_0010.pth.tar \
        --output averaged.pth.tar --recompute-bn 100 --data /imagenet
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_classification.toolkit.averaging import main  # noqa: E402  (run as a script)

if __name__ == "__main__":
    raise SystemExit(main())
