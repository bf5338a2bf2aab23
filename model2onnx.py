#!/usr/bin/env python3
"""Export a model to ONNX (dynamic batch axis, opset 13) and check the file against PyTorch in onnxruntime.

    python model2onnx.py --arch efficientnet-b0 --pretrained-from-file b0.pth -b 1          # writes b0.onnx
    python model2onnx.py --arch efficientnet-b0 --pretrained-from-file b0.pth --trt True --output b0_trt.onnx
    python model2onnx.py --arch efficientnet-quant-b0 --pretrained-from-file quantized_b0.pth  # Q/DQ nodes
"""
from image_classification.deploy.export import main

if __name__ == "__main__":
    raise SystemExit(main())
