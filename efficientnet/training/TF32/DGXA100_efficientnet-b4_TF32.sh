#!/usr/bin/env bash
# Train efficientnet-b4 to convergence on 8 GPUs of a DGXA100 with TF32; $1: workspace (default ./).
python ./multiproc.py --nproc_per_node 8 ./launch.py --model efficientnet-b4 --precision TF32 --mode convergence --platform DGXA100 /imagenet --workspace "${1:-./}" --raport-file raport.json
