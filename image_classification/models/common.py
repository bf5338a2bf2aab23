"""Building blocks shared by the model families: layer construction, squeeze-excitation, stochastic depth."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..cli import UserError
from . import fused


@dataclass(frozen=True)
class LayerConfig:
    """Settings that every conv/BN of a model shares (the reference's LayerBuilder config)."""

    conv_init: str = "fan_in"
    bn_momentum: float = 0.01
    bn_epsilon: float = 1e-3
    # "symmetric": (k-1)//2 on every side, the reference's; "same": TensorFlow's SAME, which ported TF weights need.
    padding: str = "symmetric"
    # "silu" (EfficientNet) or "relu6" (EfficientNet-Lite).
    activation: str = "silu"


PADDINGS = ("symmetric", "same")
ACTIVATIONS = ("silu", "relu6")


class LayerBuilder:
    """Creates conv/BN/activation layers so that init and BN settings live in one place."""

    def __init__(self, config: LayerConfig):
        if config.conv_init not in ("fan_in", "fan_out"):
            raise UserError(f"--conv_init must be fan_in or fan_out, got {config.conv_init!r}")
        if config.padding not in PADDINGS:
            raise UserError(f"--padding must be one of {', '.join(PADDINGS)}, got {config.padding!r}")
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {config.activation!r}")
        self.config = config

    def conv(self, kernel_size: int, in_channels: int, out_channels: int, stride: int = 1,
             groups: int = 1, act: bool = True) -> "ConvBnAct":
        """conv (no bias, symmetric (k-1)//2 padding as the reference, or TF's SAME) → BN → optional activation."""
        # SAME equals the symmetric padding for odd kernels at stride 1 and for odd inputs; where the conv strides
        # over an even input, TF pads one row (column) less at the top (left).
        same = self.config.padding == "same" and (stride > 1 or kernel_size % 2 == 0)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                         padding=0 if same else (kernel_size - 1) // 2, groups=groups, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode=self.config.conv_init, nonlinearity="relu")
        layers = [("conv", conv), ("bn", self.batchnorm(out_channels))]
        if same:
            layers.insert(0, ("pad", SamePadding(kernel_size, stride)))
        if act:
            layers.append(("activation", self.activation()))
        return ConvBnAct(OrderedDict(layers))

    def batchnorm(self, channels: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(channels, momentum=self.config.bn_momentum, eps=self.config.bn_epsilon)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        return bn

    def activation(self) -> nn.Module:
        return ReLU6() if self.config.activation == "relu6" else SiLU()


class SamePadding(nn.Module):
    """TensorFlow's SAME padding for a k×k conv of stride s: (⌈H/s⌉-1)·s + k - H zeros in all, the odd one at the
    bottom (right). It depends on the input's size, so it is computed per call (parameter-free)."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"SAME padding of a {kernel_size}x{kernel_size} conv of stride {stride} would crop")
        self.kernel_size = kernel_size
        self.stride = stride

    def amount(self, size: int) -> int:
        # TF clips this at 0, which only a kernel smaller than its stride reaches (refused above): without the
        # max() the ONNX tracer records the padding without warning that a comparison became a constant.
        return (size + self.stride - 1) // self.stride * self.stride - self.stride + self.kernel_size - size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = self.amount(x.shape[-2]), self.amount(x.shape[-1])
        return F.pad(x, [width // 2, width - width // 2, height // 2, height - height // 2])


class ConvBnAct(nn.Sequential):
    """[SAME pad →] conv → BN → optional activation, named conv, bn, activation as the reference's layers (and
    state-dict keys; the parameter-free `pad` exists only in layers with TF's SAME padding).

    Where `fused.applies` (CPU, float32, channels_last, eager), BN and SiLU run as one fused kernel: a b0
    training step spends about a fifth of its time in them, and the fused passes take 55-70 % of ATen's
    (models/fused.py). A BN without SiLU stays ATen's, which the fused kernel does not beat.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_act(self.conv(self.padded(x)))

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """The conv's input: `x` with TF's SAME padding in a layer that has it (else the conv pads by itself)."""
        if hasattr(self, "pad"):
            return self.pad(x)
        return x

    def bn_act(self, x: torch.Tensor) -> torch.Tensor:
        """The layer after its convolution: BN, then the activation when the layer has one."""
        if hasattr(self, "activation"):
            if not torch.jit.is_scripting():
                out = self._fused_bn_silu(x)
                if out is not None:
                    return out
            return self.activation(self.bn(x))
        return self.bn(x)

    @torch.jit.unused  # TorchScript compiles the call, never the body: scripted models run the plain layers
    def _fused_bn_silu(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if isinstance(self.activation, SiLU) and fused.applies(self.bn, x):
            return fused.batch_norm_act(self.bn, x, silu=True)
        return None


class SiLU(nn.SiLU):
    """SiLU computed in place only where autograd records nothing.

    Under autograd an in-place SiLU has to clone its input to keep it for backward, a copy of every activated
    tensor (about 4 % of a b0 fp32 CPU training step); the out-of-place one keeps its input without copying and
    holds the same memory. Inference (no grad) stays in place and allocates nothing.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


class ReLU6(nn.ReLU6):
    """ReLU6 (EfficientNet-Lite's activation) in place only where autograd records nothing, as `SiLU`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


class SqueezeExcitation(nn.Module):
    """Channel attention: mean over H,W → squeeze → SiLU → expand → sigmoid → scale the input.

    With `trt=True` the squeeze/expand layers are 1×1 convolutions after an AdaptiveAvgPool2d,
    the form TensorRT fuses (weights [out, in, 1, 1] instead of [out, in]); both compute the same.
    Training in float32 channels_last on a CPU, the Linear form runs as one autograd node whose backward
    makes two passes over the activations instead of five (models/fused.py).
    """

    # A constant to TorchScript, which then compiles only the form this module has (only one has `pooling`).
    __constants__ = ["trt"]

    def __init__(self, channels: int, squeeze_channels: int, trt: bool = False):
        super().__init__()
        self.trt = trt
        if trt:
            self.pooling = nn.AdaptiveAvgPool2d(1)
            self.squeeze = nn.Conv2d(channels, squeeze_channels, 1)
            self.expand = nn.Conv2d(squeeze_channels, channels, 1)
        else:
            self.squeeze = nn.Linear(channels, squeeze_channels)
            self.expand = nn.Linear(squeeze_channels, channels)
        self.activation = SiLU()
        self.sigmoid = nn.Sigmoid()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel weights in (0, 1), shaped [N, C, 1, 1]."""
        # sum / (H·W) rather than mean: its backward broadcasts the gradient as a view, where mean's backward
        # writes a full-size divided copy of it (1.5 % of a b0 CPU training step).
        s = self.pooling(x) if self.trt else x.sum((2, 3)) / (x.shape[2] * x.shape[3])
        s = self.sigmoid(self.expand(self.activation(self.squeeze(s))))
        return s if self.trt else s[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not self.trt:
            out = self._fused(x)
            if out is not None:
                return out
        return x * self.attention(x)

    @torch.jit.unused  # TorchScript compiles the call, never the body: scripted models run the layers
    def _fused(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if fused.se_applies(x, self.squeeze, self.expand):
            return fused.squeeze_excitation(x, self.squeeze, self.expand)
        return None


class _Fp32Conv(torch.autograd.Function):
    """conv2d (no bias) computed in fp32 on low-precision activations; saves them in their own dtype.

    Keeping the saved input in bf16 (upcast again in backward) keeps the memory of the bf16 path.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, groups)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.float(), weight, None, stride, padding, 1, groups).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, groups = ctx.conv
        need_input, need_weight = ctx.needs_input_grad[:2]
        grad_input = torch.empty_like(x) if need_input else None
        grad_weight = None
        # Half a batch at a time, so that the fp32 copies of input and gradient and the fp32 input gradient
        # are half-size: the step's peak memory stays at or below the plain bf16 convolution's (b0, 16 x 112:
        # 187.9 against 188.2 MiB; whole-batch fp32 copies made it 189.5).
        half = (x.shape[0] + 1) // 2
        with torch.autocast(x.device.type, enabled=False):
            for rows in (slice(start, start + half) for start in range(0, x.shape[0], half)):
                x_part, grad_part = x[rows], grad[rows].float()
                if need_weight:
                    part = torch.nn.grad.conv2d_weight(x_part.float(), weight.shape, grad_part, stride, padding, 1,
                                                       groups)
                    grad_weight = part if grad_weight is None else grad_weight + part
                if need_input:
                    grad_input[rows] = torch.nn.grad.conv2d_input(x_part.shape, weight.float(), grad_part, stride,
                                                                  padding, 1, groups)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_input, grad_weight, None, None, None


def depthwise_conv_bn_act(layer: ConvBnAct, x: torch.Tensor) -> torch.Tensor:
    """Run a depthwise conv → BN → SiLU layer; while training under CPU bf16 autocast the conv runs in fp32.

    Why: oneDNN's bf16 depthwise-convolution backward is about 3x slower than its fp32 one on AVX-512/AMX CPUs
    (measured on b0: 372 vs 118 ms of a 16x112 step), while every other bf16 kernel is faster. Computing this
    one conv in fp32 (from the bf16 activations, rounded back to bf16 after) makes the bf16 training step up to
    1.7x faster and is, if anything, more accurate. Inference (no grad) keeps the faster bf16 forward; fp32 runs
    and GPU autocast are untouched.
    """
    if x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu") \
            and x.dtype != torch.float32:
        conv = layer.conv
        return layer.bn_act(_Fp32Conv.apply(layer.padded(x), conv.weight, conv.stride, conv.padding, conv.groups))
    return layer(x)


def fp32_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int],
                groups: int) -> torch.Tensor:
    """TorchScript's form of `_Fp32Conv` (which it cannot compile): conv2d (no bias) in fp32 on `x`, in x's dtype.

    The same forward; autograd keeps the fp32 copy of `x` for backward and computes the weight gradient over the
    whole batch at once. aten::convolution, unlike conv2d, is not cast by the eager autocast; the disabled block
    keeps TorchScript's own autocast pass (when the graph executor optimises) from casting it.
    """
    with torch.autocast("cpu", enabled=False):
        out = torch.convolution(x.float(), weight, None, stride, padding, [1, 1], False, [0, 0], groups)
    return out.to(x.dtype)


STOCHASTIC_DEPTH_MODES = ("batch", "sample")


def drop_samples(x: torch.Tensor, survival_prob: float) -> torch.Tensor:
    """Drop whole samples of `x` with probability 1 - survival_prob, rescaling the rest (timm's, torchvision's)."""
    keep = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device)
    keep.bernoulli_(survival_prob).div_(survival_prob)
    return x * keep


class StochasticDepthResidual(nn.Module):
    """The residual add of a block, whose branch stochastic depth drops while training (identity in eval).

    `mode` "batch", the reference's: one draw per forward keeps the branch (scaled by 1/survival_prob) or
    drops it for the whole batch of this process. The draw is the reference's own, dropout of a scalar
    one, so a seed gives its masks and its logits. "sample": one draw per sample, as timm and torchvision.
    The reference keeps that one in a non-persistent buffer; TorchScript would put such a buffer in a scripted
    model's state dict, so it is made at each draw here (the same tensor, the same random numbers).
    """

    # Constants to TorchScript, which then compiles only the mode this block has.
    __constants__ = ["survival_prob", "per_sample"]

    def __init__(self, survival_prob: float, mode: str = "batch"):
        super().__init__()
        if mode not in STOCHASTIC_DEPTH_MODES:
            raise UserError(f"--stochastic-depth-mode must be one of {', '.join(STOCHASTIC_DEPTH_MODES)}, "
                            f"got {mode!r}")
        self.survival_prob = survival_prob
        self.per_sample = mode == "sample"

    def forward(self, residual: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        if not self.training or self.survival_prob >= 1.0:
            return residual + branch
        if self.per_sample:
            return residual + drop_samples(branch, self.survival_prob)
        mask = F.dropout(torch.ones((), device=branch.device), p=1.0 - self.survival_prob, training=True)
        return torch.addcmul(residual, mask, branch)


def make_divisible(channels: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor` (at least `divisor`), adding one step if that lost >10%."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return int(rounded)
