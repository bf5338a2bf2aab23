#!/usr/bin/env bash
# Train efficientnet-b0 on the CPU (float32); $1: workspace (default ./), $2: data folder (default /imagenet). Slow: meant for small data sets and checks.
python ./launch.py --model efficientnet-b0 --precision FP32 --mode convergence --platform CPU "${2:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json
