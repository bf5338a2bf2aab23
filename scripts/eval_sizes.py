#!/usr/bin/env python3
"""Validate one model at several evaluation sizes and crop fractions (see image_classification/eval_sizes.py).

    .venv/bin/python scripts/eval_sizes.py /imagenet --arch efficientnet-b0 \
        --pretrained-from-file ws/model_best.pth.tar --sizes 224 256 288 --crop-pcts 0.875 1.0
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_classification.train.eval_sizes import main  # noqa: E402  (run as a script)

if __name__ == "__main__":
    raise SystemExit(main())
