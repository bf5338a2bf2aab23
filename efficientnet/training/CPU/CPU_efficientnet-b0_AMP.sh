#!/usr/bin/env bash
# Train efficientnet-b0 on the CPU (bf16 autocast); $1: workspace (default ./), $2: data folder
# (default /imagenet). configs.yml's ImageNet recipe (400 epochs, optimizer batch 4096): slow on a CPU; for a
# small dataset see README.md, "Small data".
python ./launch.py --model efficientnet-b0 --precision AMP --mode convergence --platform CPU "${2:-/imagenet}" --workspace "${1:-./}" --raport-file raport.json
