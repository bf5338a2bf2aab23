"""policy_v0 (autoaugment.py's table) inside a DALI pipeline: dali-cpu and dali-gpu's `--augmentation autoaugment`.

Each operation is an `nvidia.dali.auto_aug` augmentation written to give Pillow's pixels, not DALI's
stock suite (whose equalize, colour, auto-contrast and shears use other formulas or filters):

    images = autoaugment(images, magnitude, image_size)   # HWC uint8, square, after the crop and the flip

`apply_auto_augment` draws the sub-policy, whether each operation runs and each sign from DALI's own
generators (seeded by the pipeline, checkpointed with it), so the draws are the reference's distribution,
not its sequence. Measured against the reference's autoaugment.py (tests/test_parity_augment.py):

- exact: shearX, shearY (Pillow's bicubic, a = -1, emulated in float64: four nearest-neighbour taps and
  the cubic polynomial in Pillow's operation order), translateY, color, posterize, solarize, solarizeadd,
  autocontrast, invert.
- rotate: nearest neighbour at Pillow's 16.16 fixed-point source coordinates, which DALI's warp evaluates
  in float32: a neighbouring source pixel for 0-2 of 50,176 pixels at 224 px and 30-110 of 144,400 at
  380 px (policy angles, both signs; exact on the 64x48 test image).
- equalize: DALI's equalize maps by OpenCV's formula (inclusive cumulative histogram scaled by
  255 / (N - count of the lowest value), rounded), Pillow's by the exclusive cumulative histogram
  divided by (N - count of the highest value) // 255. The gap grows with the share of the most frequent
  values: mean 3.8/255, at most 21/255 on the 64x48 test image (about 60 levels per channel); mean
  2.5-5.3/255, at most 12/255 on generated images at 224 and 380 px. DALI has no histogram or per-sample
  lookup operator on the CPU to do Pillow's (a one-hot histogram would cost 256 bytes per pixel).
"""
from __future__ import annotations

import math

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug.auto_augment import apply_auto_augment
from nvidia.dali.auto_aug.core import Policy, augmentation
from nvidia.dali.auto_aug.core import _Augmentation as Augmentation  # what @augmentation makes
from nvidia.dali.data_node import DataNode

from .autoaugment import FILL, MAGNITUDES, NUM_MAGNITUDE_BINS, SIGNED, SUB_POLICIES

FILL_VALUE = FILL[0]


def autoaugment(images: DataNode, magnitude: int, image_size: int) -> DataNode:
    """--augmentation autoaugment: policy_v0 on a batch of `image_size` x `image_size` HWC uint8 images (its
    magnitudes are its own table's; --randaug-magnitude does not apply)."""
    return apply_auto_augment(policy(image_size, image_size), images)


def policy(width: int, height: int) -> Policy:
    """autoaugment.SUB_POLICIES as a DALI Policy for `width` x `height` images.

    Operations of probability 0 are left out: DALI warns about them, and they never run.
    """
    operations = augmentations(width, height)
    sub_policies = [[(operations[name], probability, magnitude_bin if name in MAGNITUDES else None)
                     for name, probability, magnitude_bin in sub_policy if probability > 0]
                    for sub_policy in SUB_POLICIES]
    return Policy(name="policy_v0", num_magnitude_bins=NUM_MAGNITUDE_BINS, sub_policies=sub_policies)


def augmentations(width: int, height: int) -> dict[str, Augmentation]:
    """Each operation of policy_v0 as a DALI augmentation for `width` x `height` images, by the policy's names."""
    def magnitudes(name: str, **options) -> dict:
        """@augmentation's arguments for an operation with a magnitude: its table, signed or not."""
        return dict(mag_range=np.array(MAGNITUDES[name]), randomly_negate=name in SIGNED, name=name, **options)

    @augmentation(**magnitudes("shearX", mag_to_param=float64_parts))
    def shear_x(images, factor_parts):
        return _bicubic_shear(images, _float64(factor_parts), axis=1, width=width, height=height)

    @augmentation(**magnitudes("shearY", mag_to_param=float64_parts))
    def shear_y(images, factor_parts):
        return _bicubic_shear(images, _float64(factor_parts), axis=0, width=width, height=height)

    @augmentation(**magnitudes("translateY", mag_to_param=lambda pixels: _affine(1, 0, 0, 0, 1, pixels)))
    def translate_y(images, matrix):
        return _nearest_warp(images, matrix)

    @augmentation(**magnitudes("rotate", mag_to_param=lambda degrees: _rotation(degrees, width, height)))
    def rotate(images, matrix):
        return _nearest_warp(images, matrix)

    @augmentation(**magnitudes("color", mag_to_param=np.float32, param_device="auto"))
    def color(images, factor):
        return _color(images, factor)

    @augmentation(**magnitudes("posterize", mag_to_param=_posterize_mask, param_device="auto"))
    def posterize(images, mask):
        return images & mask

    @augmentation(**magnitudes("solarize", param_device="auto"))
    def solarize(images, threshold):
        kept = images < threshold  # a float32 threshold divides whole values as Pillow's float64 one does
        return _select(kept, images, 255 - fn.cast(images, dtype=types.INT32))

    @augmentation(**magnitudes("solarizeadd", mag_to_param=np.int32, param_device="auto"))
    def solarize_add(images, addition):
        added = dmath.min(fn.cast(images, dtype=types.INT32) + addition, 255)
        return _select(images < 128, added, images)

    @augmentation(name="autocontrast")
    def autocontrast(images, _):
        return _autocontrast(images)

    @augmentation(name="equalize")
    def equalize(images, _):
        return fn.equalize(images)

    @augmentation(name="invert")
    def invert(images, _):
        return types.Constant(255, dtype=types.UINT8) - images

    return {aug.name: aug for aug in (shear_x, shear_y, translate_y, rotate, color, posterize, solarize,
                                      solarize_add, autocontrast, equalize, invert)}


# --- helpers ---------------------------------------------------------------------------------------------

def float64_parts(value: float) -> np.ndarray:
    """`value` as three float32 numbers whose float64 sum, in order, is `value` exactly (53 bits in 3 x 24).

    DALI keeps the parameters `@augmentation` precomputes, and its constants, in float32; the shears need
    the float64 factor Pillow multiplies with.
    """
    high = np.float32(value)
    middle = np.float32(value - float(high))
    low = np.float32(value - float(high) - float(middle))
    return np.array([high, middle, low], dtype=np.float32)


def _float64(parts: DataNode) -> DataNode:
    """The float64 number of `float64_parts`, per sample."""
    high, middle, low = (fn.cast(parts[i], dtype=types.FLOAT64) for i in range(3))
    return high + middle + low


def _affine(*matrix: float) -> np.ndarray:
    """A warp_affine matrix (output pixel centre -> input position, Pillow's AFFINE data): float32 [2, 3]."""
    return np.array(matrix, dtype=np.float32).reshape(2, 3)


def _nearest_warp(images: DataNode, matrix: DataNode, fill: int | None = FILL_VALUE) -> DataNode:
    """Pillow's nearest-neighbour affine transform: output (x, y) takes input pixel floor(M (x+1/2, y+1/2)),
    or `fill` outside the image (the border pixel with None). DALI's warp uses the same convention (measured:
    identical pixels for any float32-exact matrix)."""
    options = {} if fill is None else {"fill_value": fill}
    return fn.warp_affine(images, matrix=matrix, inverse_map=True, interp_type=types.INTERP_NN, **options)


def _rotation(degrees: float, width: int, height: int) -> np.ndarray:
    """Pillow's rotate(degrees) matrix, as the 16.16 fixed-point numbers its nearest-neighbour path uses.

    Image.rotate maps about (width/2, height/2) with cos/sin rounded to 15 decimals; the fixed-point
    transform then steps through output pixels in integer 1/65536ths (affine_fixed in Pillow's
    Geometry.c). Giving DALI those integers / 65536 reproduces its choice of source pixels up to float32
    rounding (see the module docstring).
    """
    if degrees % 360.0 == 0:  # Pillow copies the image
        return _affine(1, 0, 0, 0, 1, 0)
    angle = -math.radians(degrees)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2.0, height / 2.0
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy

    def fixed(value: float) -> int:
        return math.floor(value * 65536.0 + 0.5)

    # Pillow's source position of output pixel (x, y) is (A0 x + A1 y + A2) / 65536, floored; DALI's is
    # m0 (x + 1/2) + m1 (y + 1/2) + m2.
    a0, a1, d0, d1 = fixed(a), fixed(b), fixed(d), fixed(e)
    a2, d2 = fixed(c + a * 0.5 + b * 0.5), fixed(f + d * 0.5 + e * 0.5)
    unit = 65536.0
    return _affine(a0 / unit, a1 / unit, (a2 - (a0 + a1) / 2) / unit,
                   d0 / unit, d1 / unit, (d2 - (d0 + d1) / 2) / unit)


def _bicubic_shear(images: DataNode, factor: DataNode, *, axis: int, width: int, height: int) -> DataNode:
    """Pillow's AFFINE transform with BICUBIC for a shear along `axis` (1: x, shearX; 0: y, shearY).

    Output (x, y) of shearX samples the input row y at s = (x + 1/2) + factor (y + 1/2): grey when s is
    outside [0, width); else Pillow's cubic convolution (a = -1) of the four pixels around s - 1/2, edge
    pixels repeated, evaluated in float64 in Pillow's order and truncated. The other axis is sampled at
    pixel centres, where the cubic is the pixel itself. `factor` is float64 (the signed magnitude).
    """
    length, across = (width, height) if axis == 1 else (height, width)
    along_shape, across_shape = [1, 1, 1], [1, 1, 1]
    along_shape[axis], across_shape[1 - axis] = length, across
    # Pixel centres are exact in DALI's float32 constants; products with the float64 factor are float64.
    centres = types.Constant((np.arange(length, dtype=np.float64) + 0.5).reshape(along_shape))
    across_centres = types.Constant((np.arange(across, dtype=np.float64) + 0.5).reshape(across_shape))
    position = centres + factor * across_centres  # Pillow: a0 * xin + a1 * yin (+ 0)
    inside = (position >= 0.0) & (position < float(length))
    position = position - 0.5
    fraction = position - dmath.floor(position)
    # Tap k is input pixel floor(position) - 1 + k along the axis: a nearest-neighbour warp with the shear's
    # matrix offset by k - 3/2 (the row offset factor (y + 1/2) stays at least 0.005 from an integer for
    # the policy's magnitudes, so float32 cannot floor it differently from float64).
    unit_shear = _affine(0, 1, 0, 0, 0, 0) if axis == 1 else _affine(0, 0, 0, 1, 0, 0)
    taps = []
    for k in range(4):
        offset = _affine(1, 0, k - 1.5, 0, 1, 0) if axis == 1 else _affine(1, 0, 0, 0, 1, k - 1.5)
        matrix = types.Constant(offset) + fn.cast(factor, dtype=types.FLOAT) * types.Constant(unit_shear)
        taps.append(fn.cast(_nearest_warp(images, matrix, fill=None), dtype=types.INT32))
    v1, v2, v3, v4 = taps
    p1 = fn.cast(v2, dtype=types.FLOAT64)
    p2 = fn.cast(-v1 + v3, dtype=types.FLOAT64)
    p3 = fn.cast(2 * (v1 - v2) + v3 - v4, dtype=types.FLOAT64)
    p4 = fn.cast(-v1 + v2 - v3 + v4, dtype=types.FLOAT64)
    fraction, inside = _like(fraction, images), _like(inside, images)
    value = p1 + fraction * (p2 + fraction * (p3 + fraction * p4))
    return _select(inside, dmath.clamp(dmath.floor(value), 0.0, 255.0), FILL_VALUE)


def _color(images: DataNode, factor: DataNode) -> DataNode:
    """ImageEnhance.Color: Image.blend(grey, image, factor) with Pillow's integer grey
    (R 19595 + G 38470 + B 7471 + 2^15) >> 16 and its float32 blend, truncated (clamped when extrapolating)."""
    pixels = fn.cast(images, dtype=types.INT32)
    weights = types.Constant(np.array([19595, 38470, 7471], dtype=np.int32).reshape(1, 1, 3))
    grey = (fn.reductions.sum(pixels * weights, axis_names="C", keep_dims=True) + 32768) // 65536
    grey = fn.cast(grey, dtype=types.INT32)
    blended = grey + factor * (pixels - grey)  # int32 + float32 * int32: float32, as in Pillow's C
    return fn.cast(dmath.clamp(dmath.floor(blended), 0.0, 255.0), dtype=types.UINT8)


def _autocontrast(images: DataNode) -> DataNode:
    """ImageOps.autocontrast (no cutoff): per channel, int(v * scale + offset) with scale = 255 / (hi - lo) and
    offset = -lo * scale in float64, as Pillow builds its table; a channel of one value is left as it is."""
    low = fn.cast(fn.reductions.min(images, axis_names="HW", keep_dims=True), dtype=types.FLOAT64)
    high = fn.cast(fn.reductions.max(images, axis_names="HW", keep_dims=True), dtype=types.FLOAT64)
    flat = high <= low
    scale = 255.0 / (high - low + flat)  # float64; a flat channel gets a finite scale it does not use
    offset = -low * scale
    stretched = fn.cast(images, dtype=types.FLOAT64) * scale + offset
    return _select(flat, images, dmath.clamp(dmath.floor(stretched), 0.0, 255.0))


def _posterize_mask(bits: int) -> np.ndarray:
    """The AND mask that keeps the top `bits` bits (0 keeps none; Pillow 13 refuses 0 bits, which the policy's
    bins never ask for)."""
    return np.array(0xFF & ~(2 ** (8 - int(bits)) - 1), dtype=np.uint8)


def _select(condition: DataNode, if_true, if_false) -> DataNode:
    """uint8 `if_true` where `condition`, else `if_false` (numbers in 0..255, broadcast against each other)."""
    chosen = condition * if_true + (True ^ condition) * if_false
    return fn.cast(chosen, dtype=types.UINT8)


def _like(node: DataNode, images: DataNode) -> DataNode:
    """`node` (computed on the CPU from CPU parameters) on the device of `images`."""
    return node.gpu() if images.device == "gpu" else node
