"""Quantized EfficientNets (efficientnet-quant-b0…b7, efficientnet-quant-lite0…4) on NVIDIA Model Optimizer.

The float network with INT8 fake-quantizers where the reference (pytorch-quantization) put them:
per-channel weights and per-tensor inputs of every conv and linear layer, both inputs of the
squeeze-excitation multiply (`se.mul_a_quantizer` on the attention, `se.mul_b_quantizer` on the
features) and the skip input of every residual add (`residual_quantizer`). Squeeze-excitation is
always the TensorRT form (1×1 convs). Model Optimizer converts the layers; this module only says
where the quantizers go and owns the state format: quantizer ranges are `<quantizer>._amax`
buffers, and NGC's QAT files (pytorch-quantization names) are mapped onto them.

Model Optimizer is imported lazily (it adds seconds to every start) when a quantized model is built.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..cli import UserError
from .common import SqueezeExcitation
from .efficientnet import EFFICIENTNET_B0, NGC, SCALING, EfficientNet, EfficientNetArch, EfficientNetParams, \
    MBConvBlock, ModelSpec, lite_specs
from .weights import WeightsError

QUANT_PRETRAINED_URLS = {
    f"efficientnet-quant-{m}":
        f"{NGC}/efficientnet_{m}_pyt_qat_ckpt_fp32/versions/21.03.0/files/nvidia-efficientnet-quant-{m}-130421.pth"
    for m in ("b0", "b4")
}

CALIBRATORS = ("histogram", "max", "percentile")

# Quantizers of our own (not conv/linear inputs and weights); their names are the reference's.
EXTRA_QUANTIZERS = ("mul_a_quantizer", "mul_b_quantizer", "residual_quantizer")

_WEIGHT = {"num_bits": 8, "axis": 0}  # per output channel
_INPUT = {"num_bits": 8, "axis": None}  # per tensor


def quant_config(calibrator: str = "histogram") -> dict:
    """The Model Optimizer config of the reference's placement; input ranges collected by `calibrator`.

    `histogram` and `percentile` both collect histograms (they differ in how the range is read from
    them, see quantization.calibrate); `max` tracks the running absolute maximum. The config carries
    no calibration algorithm: building a model only places quantizers, calibration is a separate step.
    """
    if calibrator not in CALIBRATORS:
        raise UserError(f"unknown calibrator {calibrator!r}; choose from {', '.join(CALIBRATORS)}")
    activation = {**_INPUT, "calibrator": "max" if calibrator == "max" else "histogram"}
    # Deny all first: Model Optimizer also wraps BatchNorm and pooling layers, which the reference left float.
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for parent in ("nn.Conv2d", "nn.Linear"):
        entries.append({"quantizer_name": "*weight_quantizer", "parent_class": parent, "cfg": dict(_WEIGHT)})
        entries.append({"quantizer_name": "*input_quantizer", "parent_class": parent, "cfg": dict(activation)})
    entries += [{"quantizer_name": f"*{name}", "cfg": dict(activation)} for name in EXTRA_QUANTIZERS]
    return {"quant_cfg": entries, "algorithm": None}


class QuantSqueezeExcitation(SqueezeExcitation):
    """Squeeze-excitation whose multiply sees quantized inputs (Model Optimizer's quantized SE)."""

    def _setup(self) -> None:
        from modelopt.torch.quantization.nn import TensorQuantizer
        self.mul_a_quantizer = TensorQuantizer()
        self.mul_b_quantizer = TensorQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reference naming: operand "a" is the attention, "b" the features it scales.
        return self.mul_a_quantizer(self.attention(x)) * self.mul_b_quantizer(x)


class QuantMBConvBlock(MBConvBlock):
    """MBConv whose residual add gets a quantized skip input, so TensorRT can fuse the add into the conv."""

    def _setup(self) -> None:
        if self.residual:
            from modelopt.torch.quantization.nn import TensorQuantizer
            self.residual_quantizer = TensorQuantizer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.proj(self.se(self.depsep(out)))
        if self.residual_add is None:
            return out
        return self.residual_add(self.residual_quantizer(x), out)


@functools.cache
def modelopt_quantization():
    """`modelopt.torch.quantization`, with our SE and MBConv blocks registered as quantizable (once).

    Its import prints two messages on every machine without CUDA (a CUDA_HOME guess of torch's extension
    loader, and torch.jit.script's deprecation); neither concerns our users, so only those two are muted.
    """
    extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = extension_log.level
    extension_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
            import modelopt.torch.quantization as mtq
    finally:
        extension_log.setLevel(level)
    mtq.register(original_cls=SqueezeExcitation, quantized_cls=QuantSqueezeExcitation)
    mtq.register(original_cls=MBConvBlock, quantized_cls=QuantMBConvBlock)
    return mtq


def quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """The enabled Model Optimizer quantizers of `model`, by module name."""
    TensorQuantizer = modelopt_quantization().nn.TensorQuantizer
    return {name: m for name, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


def place_ranges(model: nn.Module) -> None:
    """Move every quantizer's state (its range, `_amax`) to the device of the model's weights.

    Ranges are born elsewhere: Model Optimizer's histogram and percentile calibrators return them as CPU
    tensors, and a range made room for by a checkpoint load is created where the checkpoint was read. Left
    there, DDP's buffer broadcast fails on an NCCL-only process group, and on one GPU every forward copies each
    range to the device (about 100 blocking copies per b0 forward).
    """
    device = next(model.parameters()).device
    TensorQuantizer = modelopt_quantization().nn.TensorQuantizer
    for module in model.modules():
        if isinstance(module, TensorQuantizer):
            module.to(device)


def missing_ranges(model: nn.Module) -> list[str]:
    """Names of enabled quantizers that have no range (`_amax`) yet: the model is not calibrated."""
    return [name for name, q in quantizers(model).items() if getattr(q, "amax", None) is None]


def _range_shape(model: nn.Module, quantizer_name: str) -> torch.Size:
    """The `_amax` shape Model Optimizer gives this quantizer: per output channel for weights, else scalar."""
    owner_name, _, kind = quantizer_name.rpartition(".")
    if kind == "weight_quantizer":
        weight = model.get_submodule(owner_name).weight
        return torch.Size([weight.shape[0]] + [1] * (weight.dim() - 1))
    return torch.Size([])


def _create_range_buffer(module: nn.Module, state_dict: Mapping, prefix: str, *args) -> None:
    """load_state_dict pre-hook: give an uncalibrated quantizer the `_amax` buffer a checkpoint brings.

    Model Optimizer registers `_amax` only when a quantizer is calibrated; without this, resuming a
    QAT checkpoint into a freshly built model would report the ranges as unexpected keys.
    """
    key = prefix + "_amax"
    if key in state_dict and getattr(module, "amax", None) is None:
        module.amax = torch.zeros_like(state_dict[key])


class QuantEfficientNet(EfficientNet):
    """EfficientNet with the reference's INT8 quantizer placement (always the TensorRT form of SE)."""

    def __init__(self, arch: EfficientNetArch, dropout: float, survival_prob: float = 1.0, num_classes: int = 1000,
                 conv_init: str = "fan_in", bn_momentum: float = 0.01, bn_epsilon: float = 1e-3, trt: bool = True,
                 stochastic_depth_mode: str = "batch", padding: str = "symmetric"):
        if not trt:
            raise UserError("quantized EfficientNets always use the TensorRT form of squeeze-excitation; "
                             "--trt False is not available for efficientnet-quant-*")
        super().__init__(arch, dropout, survival_prob, num_classes, conv_init, bn_momentum, bn_epsilon, trt=True,
                         stochastic_depth_mode=stochastic_depth_mode, padding=padding)
        mtq = modelopt_quantization()
        # Model Optimizer prints a count of inserted quantizers; scripts such as classify.py own stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            mtq.quantize(self, quant_config(), forward_loop=None)
        for quantizer in quantizers(self).values():
            quantizer.register_load_state_dict_pre_hook(_create_range_buffer)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """nn.Module's load, leaving the loaded ranges beside the weights (see `place_ranges`)."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        place_ranges(self)
        return result

    def __prepare_scriptable__(self) -> "QuantEfficientNet":
        """torch.jit.script calls this first: refuse in one line rather than with TorchScript's deep error."""
        raise UserError("--jit script: efficientnet-quant-* cannot be scripted: Model Optimizer's TensorQuantizer "
                        "(the fake-quantizers of every layer) is Python that TorchScript does not compile; "
                        "use --jit compile or --jit no")

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "weights"
                         ) -> dict[str, torch.Tensor]:
        """Map NGC (pytorch-quantization) quantizer names, check the ranges and make room for them.

        Float weights (no ranges at all) are accepted: calibration gives the ranges. A file with some
        ranges but not all is an error naming the quantizers that lack one.
        """
        adapted = from_pytorch_quantization(state_dict)
        names = quantizers(self)
        ranges = {key[: -len("._amax")]: key for key in adapted if key.endswith("._amax")}
        if ranges:
            missing = [name for name in names if name not in ranges]
            if missing:
                raise WeightsError(
                    f"{source}: quantizer ranges (_amax) missing for {len(missing)} of {len(names)} quantizers: "
                    f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; calibrate the model "
                    f"(quant_main.py without --skip-calibration) or use a complete QAT checkpoint")
        for name, key in ranges.items():
            if name not in names:
                continue  # fit_state_dict reports it as unexpected
            shape = _range_shape(self, name)
            value = adapted[key]
            if value.shape != shape and value.numel() == shape.numel():
                adapted[key] = value = value.reshape(shape)  # e.g. pytorch-quantization's [1] for a scalar
            if value.shape == shape and getattr(names[name], "amax", None) is None:
                names[name].amax = torch.zeros(shape)
        return adapted


def require_ranges(model: nn.Module, source: str = "model") -> None:
    """Raise WeightsError naming the quantizers without a range; no-op for float models."""
    if not isinstance(model, QuantEfficientNet):
        return
    missing = missing_ranges(model)
    if missing:
        raise WeightsError(
            f"{source}: this quantized model has no ranges (_amax) for {len(missing)} quantizers: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}. Load a calibrated/QAT checkpoint "
            f"(--pretrained-from-file or --pretrained) or calibrate it first with quant_main.py")


# pytorch-quantization's QuantConv2d/QuantLinear call their quantizers `_input_quantizer` and
# `_weight_quantizer`; Model Optimizer's call them `input_quantizer` and `weight_quantizer`. The SE
# and residual quantizers carry the same names in both. Both store the range as `_amax`.
_PYTORCH_QUANTIZATION = re.compile(r"\._(input|weight)_quantizer\.")
_MODELOPT = re.compile(r"\.(input|weight)_quantizer\.")


def from_pytorch_quantization(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename pytorch-quantization quantizer keys (NGC QAT files) to Model Optimizer's."""
    return {_PYTORCH_QUANTIZATION.sub(r".\1_quantizer.", key): value for key, value in state_dict.items()}


def to_pytorch_quantization(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `from_pytorch_quantization`: Model Optimizer keys in the reference's naming."""
    return {_MODELOPT.sub(r"._\1_quantizer.", key): value for key, value in state_dict.items()}


def quantized_specs() -> dict[str, ModelSpec]:
    """efficientnet-quant-b0…b7 and efficientnet-quant-lite0…4: the float members built as QuantEfficientNet.

    Lite has no SE, so quantizers sit on every conv and linear input and the residual inputs; --pretrained of
    quant-lite0 loads the float weights of efficientnet-lite0's package, for quant_main.py to calibrate.
    """
    specs = {}
    for member, (width, depth, resolution, dropout, survival) in SCALING.items():
        name = f"efficientnet-quant-{member}"
        specs[name] = ModelSpec(
            EFFICIENTNET_B0.scale(width, depth, resolution),
            EfficientNetParams(dropout=dropout, survival_prob=survival, trt=True),
            build=QuantEfficientNet,
            pretrained_url=QUANT_PRETRAINED_URLS.get(name),
        )
    for member, spec in lite_specs().items():
        specs[f"efficientnet-quant-{member}"] = replace(spec, params=replace(spec.params, trt=True),
                                                        build=QuantEfficientNet)
    return specs
