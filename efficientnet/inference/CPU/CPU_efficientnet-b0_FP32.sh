#!/usr/bin/env bash
# Inference benchmark of efficientnet-b0 on the CPU (float32), batch sizes 1..64: raport_<bs>.json in $1 (default ./); $2: data folder (default /imagenet).
# Table: python scripts/inference_table.py "${1:-./}"/raport_*.json
for bs in 1 2 4 8 16 32 64; do
    python ./launch.py --model efficientnet-b0 --precision FP32 --mode benchmark_inference --platform CPU "${2:-/imagenet}" -b "${bs}" --workspace "${1:-./}" --raport-file "raport_${bs}.json"
done
