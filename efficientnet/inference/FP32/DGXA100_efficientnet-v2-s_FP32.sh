#!/usr/bin/env bash
# Inference benchmark of efficientnet-v2-s on a DGXA100 with FP32 at its evaluation size 384, batch sizes 1..128: raport_<bs>.json in $1 (default ./).
# Table: python scripts/inference_table.py "${1:-./}"/raport_*.json
for bs in 1 2 4 8 16 32 64 128; do
    python ./multiproc.py --nproc_per_node 8 ./launch.py --model efficientnet-v2-s --precision FP32 --mode benchmark_inference --platform DGXA100 /imagenet -b "${bs}" --workspace "${1:-./}" --raport-file "raport_${bs}.json"
done
