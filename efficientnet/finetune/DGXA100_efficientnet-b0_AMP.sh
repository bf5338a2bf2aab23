#!/usr/bin/env bash
# Fine-tune NVIDIA's ImageNet-trained efficientnet-b0 (NGC weights) on Oxford Flowers-102 in the ImageNet folder
# layout (/data/flowers102/train/<class>/*, val/<class>/*) on one GPU; $1: workspace (default ./). For another data
# set change the path and --num_classes; for more GPUs start it with python ./multiproc.py --nproc_per_node N.
# A new, zero-initialised classifier trains at 10x the LR, each block below the head at 0.85 to the power of its
# distance from the head, and the stem and stage 0 stay frozen (their BatchNorm statistics too). A starting
# point: these settings have not been tuned on Flowers-102.
python ./main.py /data/flowers102 \
    --arch efficientnet-b0 --pretrained --reset-classifier --num_classes 102 \
    --head-init zero --head-lr-scale 10 --layer-decay 0.85 --freeze-until 0 \
    --amp --memory-format nhwc --data-backend pytorch -j5 -b 64 \
    --epochs 30 --optimizer sgd --lr 0.01 --momentum 0.9 --weight-decay 1e-5 --lr-schedule cosine --warmup 1 \
    --label-smoothing 0.1 --workspace "${1:-./}" --raport-file raport.json
