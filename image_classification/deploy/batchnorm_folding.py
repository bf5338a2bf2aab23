"""Fold each convolution's BatchNorm into the convolution, for deployment exports of quantized models.

    folded = fold_batchnorm(model)      # a copy in eval mode: conv(x) * s + b instead of bn(conv(x))

In eval mode BN is a per-channel affine map y = s·x + t with s = γ/√(σ²+ε) and t = β − μ·s, so it folds
into the convolution before it: weights W·s, bias b·s + t. Float ONNX exports need no help (exporters and
engines fold BN themselves), but in a Q/DQ export the weights pass through QuantizeLinear/DequantizeLinear
first, which neither onnxruntime nor OpenVINO folds across: they keep a float BN after every INT8 convolution.
With per-channel symmetric weight ranges the fold is exact for the quantized weights too: scaling channel c's
weights and its range by |s_c| leaves its INT8 values as they were (negated where s_c < 0), so the folded
model computes the same function up to float rounding.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..cli import UserError


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every `conv` → `bn` pair of our layer builder folded into `conv`."""
    model = copy.deepcopy(model).eval()
    for block in model.modules():
        conv, bn = getattr(block, "conv", None), getattr(block, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            _fold(conv, bn)
            block.bn = nn.Identity()
    return model


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias)
    quantizer = getattr(conv, "weight_quantizer", None)
    if quantizer is not None and getattr(quantizer, "amax", None) is not None:
        amax = quantizer.amax
        if amax.numel() != scale.numel():
            raise UserError(f"cannot fold BatchNorm into a convolution whose weight range is not per output channel "
                             f"(range shape {list(amax.shape)}, {scale.numel()} channels)")
        quantizer.amax = amax * scale.abs().view(amax.shape)
