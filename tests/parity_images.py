"""The deterministic images of the augmentation parity fixtures (tests/fixtures/make_parity_fixtures.py writes
the reference's outputs for them, tests/test_parity_augment.py compares ours). Integer arithmetic only, so
every platform and numpy version draws the same pixels."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Sizes: the AutoAugment operations' image, the seeded-policy image, the validation image (a 4:3 photo
# shape, downscaled at 224 and upscaled at 380), and the two training images (one so elongated that most
# random-resized-crop attempts fail, which makes the attempt count matter).
OPERATION_SIZE = (64, 48)
POLICY_SIZE = (40, 30)
VAL_SIZE = (500, 375)
TRAIN_SIZES = ((240, 40), (120, 90))


def structured_image(width: int, height: int) -> np.ndarray:
    """HWC uint8: ramps, 8 px checks, a fine texture and hashed noise; no channel spans all of 0..255."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    noise = ((x * 2654435761 + y * 40503 + x * y * 97) >> 7) % 7
    red = 20 + (x * 210) // max(width - 1, 1) + noise
    green = 30 + (y * 170) // max(height - 1, 1) + ((x // 4) % 2) * 16 + noise
    blue = ((x // 8 + y // 8) % 2) * 150 + (x * x * 7 + y * 13 + x * y) % 61 + noise
    return np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless encoding of an HWC uint8 image, for the decoders of both backends."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
