#!/usr/bin/env python3
"""Run main.py's job with the configs.yml defaults of a model, precision, mode and platform.

    python launch.py --model efficientnet-b0 --precision AMP --mode convergence --platform DGXA100 /imagenet
    python multiproc.py --nproc_per_node 8 launch.py --model efficientnet-b4 --precision TF32 \\
        --mode benchmark_inference --platform DGXA100 /imagenet -b 64 --raport-file raport_64.json
    python launch.py --model efficientnet-b0 --precision FP32 --mode benchmark_training_short --platform CPU
"""
from image_classification.cli import exit_status
from image_classification.launcher import main

if __name__ == "__main__":
    raise SystemExit(exit_status(main()))
