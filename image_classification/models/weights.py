"""Reading weights safely and fitting them to a model: NGC key remapping, SE reshape, clear mismatch reports.

This module owns the weight formats the suite accepts: plain state dicts, training checkpoints
(`state_dict` / `state_dict_ema`), DataParallel/DDP `module.` prefixes, and NGC 20.12.0/21.03.0
files whose stages are named `layer<N>.` instead of `layers.<N-1>.`.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..cli import UserError


class WeightsError(UserError):
    """Weights that cannot be read or do not fit the model; the message says what and where."""


def load_file(path: str | Path) -> dict:
    """Load a checkpoint or state dict with `weights_only=True` (tensors and plain containers only), or a
    `.safetensors` state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(f"{path}: refused to load, it holds objects other than tensors and plain containers "
                           f"(only weights_only=True files are accepted): {str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else 'truncated file'})") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict or a training checkpoint, found {type(obj).__name__}")
    return dict(obj)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors
    try:
        return load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None


def extract_state_dict(obj: Mapping, ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model weights inside a training checkpoint (EMA weights with `ema`), or the dict itself."""
    if ema:
        if "state_dict_ema" not in obj or obj["state_dict_ema"] is None:
            raise WeightsError(f"{source}: has no EMA weights (state_dict_ema); it was trained without --use-ema")
        obj = obj["state_dict_ema"]
    elif "state_dict" in obj:
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{source}: holds no tensors; keys are {sorted(obj)[:10]}")
    return tensors


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


def _fit_se_shapes(state_dict: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Reshape SE weights between Linear [out, in] and 1×1 conv [out, in, 1, 1] to the model's form."""
    for key, value in state_dict.items():
        target = expected.get(key)
        if (".se." in key and target is not None and value.shape != target.shape
                and value.numel() == target.numel() and value.shape[:2] == target.shape[:2]):
            state_dict[key] = value.reshape(target.shape)


def first_non_finite(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, or None when all are finite."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


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
    fitted = remap_reference_keys(state_dict)
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
        recorded = saved.get("arch")
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
