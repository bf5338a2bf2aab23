#!/usr/bin/env bash
# Train efficientnet-widese-b4 on the CPU (bf16 autocast); $1: workspace (default ./), $2: data folder (default /imagenet). Slow: meant for small data sets and checks.
python ./launch.py --model efficientnet-widese-b4 --precision AMP --mode convergence --platform CPU "${2:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json
