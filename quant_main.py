#!/usr/bin/env python3
"""Quantization-aware training of efficientnet-quant-*: main.py's flags, plus calibration before training.

Float weights in, INT8 fake-quantized (Model Optimizer) training; the latest checkpoint is quantized_<name>,
the best model_best.pth.tar, as the reference names them:

    python quant_main.py /imagenet --arch efficientnet-quant-b0 --pretrained-from-file b0.pth \\
        --epochs 10 --optimizer sgd -b 128 --lr 0.0125 --lr-schedule cosine
    python quant_main.py /imagenet --arch efficientnet-quant-b0 --pretrained --evaluate    # NGC QAT weights

Calibration (--calibration-batches training batches, --calibrator histogram|max|percentile) runs
unless --resume, --evaluate or --skip-calibration; those take the ranges from the loaded weights. Installed with
`pip install -e .`, the same is `efficientnet-quant-train`.
"""
from image_classification.cli import exit_status
from image_classification.commands import CHECKPOINT_PREFIX
from image_classification.commands import quant_parse_args as parse_args
from image_classification.commands import quant_parse_config as parse_config
from image_classification.commands import quant_train_main as main

__all__ = ["CHECKPOINT_PREFIX", "exit_status", "main", "parse_args", "parse_config"]

if __name__ == "__main__":
    raise SystemExit(exit_status(main()))
