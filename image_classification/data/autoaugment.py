"""`--augmentation autoaugment`: the reference's AutoAugment, TensorFlow EfficientNet's "policy_v0".

The reference suite's `AutoaugmentImageNetPolicy` is not the AutoAugment paper's ImageNet policy (that one
is torchvision's `AutoAugmentPolicy.IMAGENET`, here `--augmentation autoaugment-paper`): it is the policy
TensorFlow's EfficientNet trained with, 25 sub-policies of two operations each, with its own magnitude
scale (11 bins; shears up to 0.3, translations up to 250 px whatever the image size, colour factors
0.1-1.9, posterize to 0-4 bits, SolarizeAdd). This module holds that policy as data, used by both
backends' builders, and runs it on PIL images as the reference does:

    policy = PolicyV0()          # in the training transform, after RandomResizedCrop and the flip
    image = policy(image)        # draws from Python's `random`: randint, then per operation random(),
                                 # and choice((-1, 1)) for the sign of a geometric one

The same draws give the reference's image, pixel for pixel (tests/test_parity_augment.py). The DALI
backends build the same table from DALI operators in dali_autoaugment.py.
"""
from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# (operation, probability, magnitude bin) pairs, in the reference's order: one sub-policy is drawn
# uniformly, then each of its operations runs with its probability. The bin indexes MAGNITUDES; operations
# without a magnitude (equalize, invert, autocontrast) carry the reference's bin, which nothing reads. Two
# operations have probability 0 (shearX of sub-policy 16, the second equalize of 19): they never run,
# but their draws are made, as in the reference.
SUB_POLICIES: tuple[tuple[tuple[str, float, int], tuple[str, float, int]], ...] = (
    (("equalize", 0.8, 1), ("shearY", 0.8, 4)),
    (("color", 0.4, 9), ("equalize", 0.6, 3)),
    (("color", 0.4, 1), ("rotate", 0.6, 8)),
    (("solarize", 0.8, 3), ("equalize", 0.4, 7)),
    (("solarize", 0.4, 2), ("solarize", 0.6, 2)),
    (("color", 0.2, 0), ("equalize", 0.8, 8)),
    (("equalize", 0.4, 8), ("solarizeadd", 0.8, 3)),
    (("shearX", 0.2, 9), ("rotate", 0.6, 8)),
    (("color", 0.6, 1), ("equalize", 1.0, 2)),
    (("invert", 0.4, 9), ("rotate", 0.6, 0)),
    (("equalize", 1.0, 9), ("shearY", 0.6, 3)),
    (("color", 0.4, 7), ("equalize", 0.6, 0)),
    (("posterize", 0.4, 6), ("autocontrast", 0.4, 7)),
    (("solarize", 0.6, 8), ("color", 0.6, 9)),
    (("solarize", 0.2, 4), ("rotate", 0.8, 9)),
    (("rotate", 1.0, 7), ("translateY", 0.8, 9)),
    (("shearX", 0.0, 0), ("solarize", 0.8, 4)),
    (("shearY", 0.8, 0), ("color", 0.6, 4)),
    (("color", 1.0, 0), ("rotate", 0.6, 2)),
    (("equalize", 0.8, 4), ("equalize", 0.0, 8)),
    (("equalize", 1.0, 4), ("autocontrast", 0.6, 2)),
    (("shearY", 0.4, 7), ("solarizeadd", 0.6, 7)),
    (("posterize", 0.8, 2), ("solarize", 0.6, 10)),
    (("solarize", 0.6, 8), ("equalize", 0.6, 1)),
    (("color", 0.8, 6), ("rotate", 0.4, 5)),
)

NUM_MAGNITUDE_BINS = 11

# Each operation's magnitude per bin (the reference's np.linspace tables, as Python numbers): shear
# factors, pixels, degrees, enhance factors, bits kept, solarize thresholds, SolarizeAdd offsets.
# Posterize rounds half to even as numpy does (bin 6 keeps 2 bits, bin 2 keeps 1).
MAGNITUDES: dict[str, tuple[float, ...] | tuple[int, ...]] = {
    "shearX": tuple(np.linspace(0, 0.3, NUM_MAGNITUDE_BINS).tolist()),
    "shearY": tuple(np.linspace(0, 0.3, NUM_MAGNITUDE_BINS).tolist()),
    "translateY": tuple(np.linspace(0, 250, NUM_MAGNITUDE_BINS).tolist()),
    "rotate": tuple(np.linspace(0, 30, NUM_MAGNITUDE_BINS).tolist()),
    "color": tuple(np.linspace(0.1, 1.9, NUM_MAGNITUDE_BINS).tolist()),
    "posterize": tuple(np.round(np.linspace(0, 4, NUM_MAGNITUDE_BINS)).astype(int).tolist()),
    "solarize": tuple(np.linspace(0, 256, NUM_MAGNITUDE_BINS).tolist()),
    "solarizeadd": tuple(np.linspace(0, 110, NUM_MAGNITUDE_BINS).tolist()),
}

# Operations whose magnitude gets a random sign each time they run (Python's random.choice((-1, 1))).
SIGNED = frozenset({"shearX", "shearY", "translateY", "rotate"})

# The grey that geometric operations move in from outside the image.
FILL = (128, 128, 128)


def magnitude(operation: str, magnitude_bin: int) -> float | int | None:
    """The magnitude of `operation` at `magnitude_bin` (unsigned), or None for an operation without one."""
    table = MAGNITUDES.get(operation)
    return None if table is None else table[magnitude_bin]


# --- the operations on PIL images, each as the reference computes it -------------------------------------

def shear_x(image: Image.Image, factor: float) -> Image.Image:
    """Output (x, y) samples the input at (x + factor * y, y), about the top-left corner; bicubic."""
    return image.transform(image.size, Image.Transform.AFFINE, (1, factor, 0, 0, 1, 0), Image.Resampling.BICUBIC,
                           fillcolor=FILL)


def shear_y(image: Image.Image, factor: float) -> Image.Image:
    """Output (x, y) samples the input at (x, y + factor * x), about the top-left corner; bicubic."""
    return image.transform(image.size, Image.Transform.AFFINE, (1, 0, 0, factor, 1, 0), Image.Resampling.BICUBIC,
                           fillcolor=FILL)


def translate_y(image: Image.Image, pixels: float) -> Image.Image:
    """Output row y is input row y + pixels (in pixels, whatever the image size: 225 empties a 224 px image)."""
    return image.transform(image.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, pixels), Image.Resampling.NEAREST,
                           fillcolor=FILL)


def rotate(image: Image.Image, degrees: float) -> Image.Image:
    """Counter-clockwise about the centre, nearest neighbour, same size.

    The reference rotates an RGBA copy and composites it over grey; with nearest-neighbour sampling the
    alpha is all or nothing, so filling with grey directly gives the same pixels.
    """
    return image.rotate(degrees, resample=Image.Resampling.NEAREST, fillcolor=FILL)


def color(image: Image.Image, factor: float) -> Image.Image:
    """Saturation: blend from the image's grey version (factor 0) through the image (1) and beyond."""
    return ImageEnhance.Color(image).enhance(factor)


def posterize(image: Image.Image, bits: int) -> Image.Image:
    """Keep the top `bits` bits of each channel."""
    return ImageOps.posterize(image, bits)


def solarize(image: Image.Image, threshold: float) -> Image.Image:
    """Invert the channel values at or above `threshold` (256 changes nothing)."""
    return ImageOps.solarize(image, threshold)


def solarize_add(image: Image.Image, addition: float) -> Image.Image:
    """Add `addition` to channel values below 128, saturating at 255 (TensorFlow's solarize_add)."""
    table = [min(value + int(addition), 255) if value < 128 else value for value in range(256)]
    return image.point(table * len(image.getbands()))


def autocontrast(image: Image.Image, _: None) -> Image.Image:
    """Stretch each channel's range to 0..255."""
    return ImageOps.autocontrast(image)


def equalize(image: Image.Image, _: None) -> Image.Image:
    """Equalise each channel's histogram (Pillow's formula)."""
    return ImageOps.equalize(image)


def invert(image: Image.Image, _: None) -> Image.Image:
    """255 - value."""
    return ImageOps.invert(image)


PIL_OPERATIONS: dict[str, Callable[[Image.Image, float | int | None], Image.Image]] = {
    "shearX": shear_x, "shearY": shear_y, "translateY": translate_y, "rotate": rotate, "color": color,
    "posterize": posterize, "solarize": solarize, "solarizeadd": solarize_add, "autocontrast": autocontrast,
    "equalize": equalize, "invert": invert,
}
# The operations policy_v0 uses; the reference's factory also defines translateX, contrast, sharpness and
# brightness, which none of its sub-policies uses.
OPERATIONS = tuple(PIL_OPERATIONS)


def apply(image: Image.Image, operation: str, magnitude_bin: int, sign: int = 1) -> Image.Image:
    """One operation of the policy at `magnitude_bin`, its magnitude multiplied by `sign` (signed ones only)."""
    value = magnitude(operation, magnitude_bin)
    if operation in SIGNED:
        value = value * sign
    return PIL_OPERATIONS[operation](image, value)


class PolicyV0:
    """The reference's AutoaugmentImageNetPolicy as a transform of RGB PIL images.

    Draws from the `random` module in the reference's order (sub-policy, then for each operation whether
    it runs and, when it runs a geometric operation, the sign), so that the module's state decides the
    image; the pytorch backend seeds it per sample.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        sub_policy = SUB_POLICIES[random.randint(0, len(SUB_POLICIES) - 1)]
        for operation, probability, magnitude_bin in sub_policy:
            if random.random() < probability:
                sign = random.choice((-1, 1)) if operation in SIGNED else 1
                image = apply(image, operation, magnitude_bin, sign)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
