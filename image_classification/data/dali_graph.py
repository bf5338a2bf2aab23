"""The DALI graphs of the `dali-cpu` and `dali-gpu` backends, and what may enter them.

Geometry: the reference's DALI pipelines' (HybridTrainPipe, HybridValPipe), operator for operator:
training decodes whole images, then fn.random_resized_crop (area 0.08-1, ratio 3/4-4/3, 100 attempts,
no antialiasing), and flips; validation resizes the short side to S+32 (or round(S / --eval-crop-pct)) with
DALI's rounding and no antialiasing, then crops the centre. So dali-* validation is not the pytorch
backend's (torchvision's antialiased Resize and half-to-even centre crop), exactly as the reference's two
backends differ.

Interpolation: --interpolation is the filter of the crop's and the validation's resize. --augmentation
autoaugment is the reference's policy_v0 with Pillow's own filters (dali_autoaugment.py); randaugment and
trivialaugment are nvidia.dali.auto_aug's, whose shear, translate and rotate filter linearly whatever
--interpolation says (DALI's warp_affine has no other smooth filter). autoaugment-paper (torchvision's
policy) has no DALI implementation and is refused.

Unusable files: a file that is empty, does not start with the signature of a format DALI decodes, or
whose header claims more pixels than Pillow would decode (a decompression bomb: over 2 x
PIL.Image.MAX_IMAGE_PIXELS) must never reach DALI (`unusable`); checked at no extra I/O since the loader
reads the bytes anyway. A decoder failure on a file that passes (truncated or corrupt data) is told from the
failure of any other step by `is_decode_failure`, and each file is then probed with `probe_graph`.

16-bit PNGs: DALI's decoder scales them to 8 bits as round(v / 257), which the pytorch backend matches.
"""
from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable

from PIL import Image

from ..cli import UserError
from .augmentations import POLICIES, available
from .folder import DataError
from .loader import MAGNITUDE_BINS, Triple

# Leading bytes of the formats DALI's decoders read (JPEG, PNG, BMP, TIFF both byte orders, PNM, WebP,
# JPEG 2000 codestream and file); anything else cannot decode and is replaced up front.
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*", b"P1", b"P2", b"P3", b"P4",
              b"P5", b"P6", b"RIFF", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")


# The --augmentation policies DALI runs (autoaugment-paper is torchvision's, on the pytorch backend only).
DALI_AUGMENTATIONS = tuple(available("dali"))


def dali_modules():
    """(fn, types, pipeline_def) from DALI, or a DataError saying how to install it."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as err:
        raise DataError(f"--data-backend dali-* needs NVIDIA DALI (pip install nvidia-dali-cuda130): {err}") from None
    return fn, types, pipeline_def


def interp_type(name: str):
    """DALI interpolation for an --interpolation value (the reference's mapping; its resizes do not antialias)."""
    _, types, _ = dali_modules()
    modes = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC, "triangular": types.INTERP_TRIANGULAR}
    if name not in modes:
        raise UserError(f"--interpolation must be one of {', '.join(modes)}, got {name!r}")
    return modes[name]


def looks_like_image(data: bytes) -> bool:
    """True when `data` starts with the signature of a format DALI can decode (WebP checked past RIFF)."""
    if not data.startswith(SIGNATURES):
        return False
    return not data.startswith(b"RIFF") or data[8:12] == b"WEBP"


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header (a few microseconds, no decoding), or None for other data."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment of a JPEG."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            pos += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            if pos + 9 > len(data):
                return None
            return int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big")
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def unusable(data: bytes) -> str | None:
    """Why encoded bytes must not reach DALI's decoder, or None when they may."""
    if not data:
        return "empty file"
    if not looks_like_image(data):
        return "not an image format DALI decodes"
    return decompression_bomb(data)


def decompression_bomb(data: bytes) -> str | None:
    """Pillow's decompression-bomb rule (more than 2 x PIL.Image.MAX_IMAGE_PIXELS is refused) applied to the
    header's size, so that DALI never allocates for such a file and both backends refuse the same files."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None:
        return None
    size = header_size(data)
    if size is None:  # formats other than PNG and JPEG: Pillow reads the header (and applies the rule)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                size = Image.open(io.BytesIO(data)).size
        except Image.DecompressionBombError as err:
            return f"DecompressionBombError: {err}"
        except Exception:  # noqa: BLE001 - a header Pillow cannot read: DALI's decoder will judge the file
            return None
    pixels = size[0] * size[1]
    if pixels > 2 * limit:
        return (f"DecompressionBombError: {size[0]}x{size[1]} = {pixels} pixels, over twice "
                f"PIL.Image.MAX_IMAGE_PIXELS ({2 * limit} pixels)")
    return None


def _augment(images, augmentation: str, magnitude: int, image_size: int):
    """The --augmentation policy on HWC uint8 images (an entry of augmentations.POLICIES)."""
    return POLICIES.get(augmentation).implementation(augmentation, "dali")(images, magnitude, image_size)


# --augmentation's DALI graphs (policy_v0's is dali_autoaugment.autoaugment). The policies' shear, translate and
# rotate run fn.warp_affine, which only has nearest and linear filters (it fails at the first batch on cubic or
# triangular): --interpolation applies to the resize, and the policy's geometric operations are always linear.

def randaugment(images, magnitude: int, image_size: int):
    """--augmentation randaugment: DALI's RandAugment, 2 operations of `magnitude`."""
    from nvidia.dali.auto_aug import rand_augment
    return rand_augment.rand_augment(images, n=2, m=magnitude, num_magnitude_bins=MAGNITUDE_BINS,
                                     **_warp_options(image_size))


def trivialaugment(images, magnitude: int, image_size: int):
    """--augmentation trivialaugment: DALI's TrivialAugment Wide."""
    from nvidia.dali.auto_aug import trivial_augment
    return trivial_augment.trivial_augment_wide(images, num_magnitude_bins=MAGNITUDE_BINS,
                                                **_warp_options(image_size))


def _warp_options(image_size: int) -> dict:
    _, types, _ = dali_modules()
    return dict(shape=(image_size, image_size), fill_value=128, interp_type=types.INTERP_LINEAR)


def random_resized_crop(images, image_size: int, interp):
    """The reference's HybridTrainPipe crop of whole decoded images: area 0.08-1, ratio 3/4-4/3, 100 attempts
    (then the centre crop DALI falls back to), resized to S x S without antialiasing."""
    fn, _, _ = dali_modules()
    return fn.random_resized_crop(images, size=[image_size, image_size], interp_type=interp,
                                  random_area=[0.08, 1.0], random_aspect_ratio=[0.75, 4.0 / 3.0], num_attempts=100,
                                  antialias=False)


def resize_shorter(images, resize_size: int, interp):
    """The reference's HybridValPipe resize: the short side to `resize_size`, the long side by DALI's rounding
    of the same scale (which it keeps exactly, sub-pixel), without antialiasing."""
    fn, _, _ = dali_modules()
    return fn.resize(images, resize_shorter=resize_size, interp_type=interp, antialias=False)


def _crop_mirror_normalize(images, *, normalize: bool, layout: str, mean: Triple, std: Triple, **crop_and_mirror):
    """The last step: float32 normalised by `mean`/`std`, or (`normalize` off) uint8 for the run's device to
    normalise; either in `layout` (HWC or CHW)."""
    fn, types, _ = dali_modules()
    if normalize:
        return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=list(mean),
                                        std=list(std), **crop_and_mirror)
    return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout=layout, **crop_and_mirror)


def _decoded_samples(source: Callable, decoder: str):
    """(RGB images, labels) of the (encoded image, label) batches that `source` gives."""
    fn, types, _ = dali_modules()
    encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                         dtype=[types.UINT8, types.INT64])
    return fn.decoders.image(encoded, device=decoder, output_type=types.RGB), labels


def train_graph(source: Callable, *, decoder: str, image_size: int, interp, augmentation: str | None,
                 magnitude: int, layout: str, normalize: bool, mean: Triple, std: Triple):
    """The reference's HybridTrainPipe: decode, random-resized crop, flip, normalise; a policy after the flip."""
    fn, types, _ = dali_modules()
    images, labels = _decoded_samples(source, decoder)
    images = random_resized_crop(images, image_size, interp)
    if augmentation is None:
        mirror = fn.random.coin_flip()  # in crop_mirror_normalize, as the reference
    else:
        # The reference runs its policy only on the pytorch backend, after the crop and the flip: here too.
        images = fn.flip(images, horizontal=fn.random.coin_flip())
        images = _augment(images, augmentation, magnitude, image_size)
        mirror = 0
    return _crop_mirror_normalize(images, normalize=normalize, layout=layout, mean=mean, std=std,
                                  mirror=mirror), labels


def val_graph(source: Callable, *, decoder: str, image_size: int, resize_size: int, interp, augmentation: None,
               magnitude: int, layout: str, normalize: bool, mean: Triple, std: Triple):
    """The reference's HybridValPipe: decode, resize the short side to `resize_size`, centre-crop S, normalise."""
    fn, types, _ = dali_modules()
    images, labels = _decoded_samples(source, decoder)
    images = resize_shorter(images, resize_size, interp)
    # DALI's centre crop: offset round((length - S) / 2) with halves rounded up, as the reference's.
    images = _crop_mirror_normalize(images, normalize=normalize, layout=layout, mean=mean, std=std,
                                    crop=(image_size, image_size))
    return images, labels


# DALI's error text names the operator that failed; only a decoder's failure can be blamed on a file.
DECODER_FAILURE = re.compile(r"Error in \w+ operator `nvidia\.dali\.fn\.decoders\.\w+`")


def is_decode_failure(err: Exception) -> bool:
    """Whether a pipeline error came from decoding (a bad file is to be found) rather than any other step."""
    return DECODER_FAILURE.search(str(err)) is not None


def probe_graph(source: Callable, decoder: str):
    """A decoder alone: whether DALI decodes a file (run on one image after a failed batch)."""
    fn, types, _ = dali_modules()
    encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8)
    return fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
