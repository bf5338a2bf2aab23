#!/usr/bin/env python3
"""Extract the plain model state dict from a training checkpoint.

    python checkpoint2model.py --checkpoint-path ./checkpoint.pth.tar --weight-path ./model.pth [--ema]
"""
from image_classification.deploy.export_weights import main

if __name__ == "__main__":
    raise SystemExit(main())
