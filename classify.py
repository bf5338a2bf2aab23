#!/usr/bin/env python3
"""Top-5 ImageNet (or your own) classes of one or more images.

    python classify.py --arch efficientnet-b0 --pretrained --image cat.jpg dog.jpg
    python classify.py --arch efficientnet-b4 --pretrained-from-file b4.pth --image cat.jpg --precision FP32 --cpu
    python classify.py --arch efficientnet-b0 --pretrained-from-file ws/model_best.pth.tar --num_classes 10 \\
        --class-names ws/classes.txt --image flower.jpg
"""
from image_classification.deploy.classify import main

if __name__ == "__main__":
    raise SystemExit(main())
