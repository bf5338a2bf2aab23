"""How an arch's weights expect their images: per-channel mean and std, and the resize filter.

The reference's ImageNet statistics and bilinear resize are every arch's default; a family trained with other
constants (EfficientNet-Lite, whose TensorFlow checkpoints take pixels scaled to [-1, 1]) declares its own in
its registry entry. classify.py, main.py's data loaders and model2onnx.py's files read them from there, so
weights always meet the pixels they were trained on. The validation crop is the same rule for all: short side
to S + 32, centre crop S (at 224 px the 0.875 crop of timm's and TensorFlow's EfficientNet evaluation).

Pure data: this module imports nothing heavy, so the ONNX engines can use it without PyTorch.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

Triple = tuple[float, float, float]

# ImageNet statistics on the 0..255 scale (the reference's): batches stay uint8 until they reach the device.
IMAGENET_MEAN: Triple = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD: Triple = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# Keys of an ONNX file's metadata_props that record its preprocessing (model2onnx.py writes them).
ONNX_KEYS = ("preprocessing.mean", "preprocessing.std", "preprocessing.interpolation")


@dataclass(frozen=True)
class Preprocessing:
    """Normalisation (x - mean) / std of 0..255 pixels, and the --interpolation of the resizes."""

    mean: Triple = IMAGENET_MEAN
    std: Triple = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def normalization(self) -> dict[str, Triple]:
        """mean and std as keyword arguments of the data loaders."""
        return {"mean": self.mean, "std": self.std}

    def onnx_metadata(self) -> dict[str, str]:
        """The metadata_props an exported file carries, so that an engine normalises as the model expects."""
        return dict(zip(ONNX_KEYS, (_join(self.mean), _join(self.std), self.interpolation)))

    @classmethod
    def from_onnx_metadata(cls, props: Mapping[str, str]) -> "Preprocessing":
        """The preprocessing recorded in an ONNX file's metadata_props; the reference's for files without it."""
        if not all(key in props for key in ONNX_KEYS):
            return REFERENCE
        mean, std, interpolation = (props[key] for key in ONNX_KEYS)
        return cls(_split(mean), _split(std), interpolation)


def _join(values: Triple) -> str:
    return ",".join(repr(float(v)) for v in values)


def _split(text: str) -> Triple:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise ValueError(f"expected three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


REFERENCE = Preprocessing()

# EfficientNet-Lite: Google's TF checkpoints were trained on (x - 127) / 128 ("inception-style", for easier
# post-training quantization); timm's ports and every PyTorch conversion of them use the symmetric 0.5 / 0.5
# on [0, 1] pixels, and so do we, to agree with timm exactly (the two differ by at most one 8-bit step, at black).
# Bicubic: timm's choice, the closest to TF's bilinear resize without antialiasing at these sizes.
INCEPTION = Preprocessing(mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), interpolation="bicubic")
