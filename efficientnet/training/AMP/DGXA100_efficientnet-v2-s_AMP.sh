#!/usr/bin/env bash
# Train efficientnet-v2-s to convergence on 8 GPUs of a DGXA100 with AMP: 350 epochs in 4 stages, training size 128 -> 300,
# RandAugment magnitude 15 -> 30, evaluation at 384 (configs.yml); $1: workspace (default ./).
python ./multiproc.py --nproc_per_node 8 ./launch.py --model efficientnet-v2-s --precision AMP --mode convergence --platform DGXA100 /imagenet --workspace "${1:-./}" --raport-file raport.json
