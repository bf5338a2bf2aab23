#!/usr/bin/env bash
# Train efficientnet-b0 to convergence on 8 GPUs of a DGX1V-16G with FP32; $1: workspace (default ./).
python ./multiproc.py --nproc_per_node 8 ./launch.py --model efficientnet-b0 --precision FP32 --mode convergence --platform DGX1V-16G /imagenet --workspace "${1:-./}" --raport-file raport.json
