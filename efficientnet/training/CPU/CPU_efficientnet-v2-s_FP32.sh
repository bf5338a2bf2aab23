#!/usr/bin/env bash
# Train efficientnet-v2-s on the CPU (float32), progressive as on GPUs (4 stages, 128 -> 300 px); $1: workspace (default ./), $2: data folder (default /imagenet).
# Slow: meant for small data sets and checks; to scale it down, run the command below adding e.g.
# --epochs 4 --n-stages 2 --base-image-size 48 --image-size 64 --eval-image-size 64 --optimizer-batch-size -1 --lr 0.01.
python ./launch.py --model efficientnet-v2-s --precision FP32 --mode convergence --platform CPU "${2:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json
