"""A small procedurally drawn dataset in ImageNet layout, the project's default data for CPU runs.

    python -m image_classification.data.generated --output data/generated
    python -m image_classification.data.generated --output DIR --classes 10 --train-per-class 100 \\
        --val-per-class 20 --image-size 96 --seed 0

Each class is a shape (circle, square, triangle, star, ring, cross) on a noisy two-colour gradient, or a
texture (stripes, checker, dots, waves) filling the image. Position, scale, rotation, colours, texture
period and noise are random per image, so a class is told by its shape or texture, never by its colour.
The same arguments always write byte-identical files.

`--class-set transfer` draws ten other classes in the same way (shapes hexagon, pentagon, diamond, arrow,
crescent, ellipse; textures grid, zigzag, concentric, bricks): a second dataset for fine-tuning a model
trained on the default set.
"""
from __future__ import annotations

import io
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..cli import ArgumentParser, Number, error_message, print_error

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
TEXTURES = ("stripes", "checker", "dots", "waves")
CLASS_NAMES = SHAPES + TEXTURES
TRANSFER_SHAPES = ("hexagon", "pentagon", "diamond", "arrow", "crescent", "ellipse")
TRANSFER_TEXTURES = ("grid", "zigzag", "concentric", "bricks")
CLASS_SETS = {"default": CLASS_NAMES, "transfer": TRANSFER_SHAPES + TRANSFER_TEXTURES}

# Defaults sized for 2 CPU cores: 1,000 training images make an efficientnet-b0 epoch at 64 px a matter of
# seconds to tens of seconds, and 96 px files leave room for random-resized crops and the val resize (S+32).
DEFAULT_CLASSES = 10
DEFAULT_TRAIN_PER_CLASS = 100
DEFAULT_VAL_PER_CLASS = 20
DEFAULT_IMAGE_SIZE = 96
JPEG_QUALITY = 90


def _distinct_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours far enough apart to keep the pattern visible."""
    while True:
        a, b = rng.uniform(0, 255, size=(2, 3))
        if np.abs(a - b).sum() > 180:
            return a, b


def _background(rng: np.random.Generator, size: int, colour: np.ndarray) -> np.ndarray:
    """A linear gradient from `colour` to a shifted colour at a random angle, float HWC."""
    c0, c1 = colour, np.clip(colour + rng.uniform(-70, 70, size=3), 0, 255)
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = ((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle)) / math.sqrt(2) + 0.5
    return c0 + (c1 - c0) * t[..., None]


def _polygon(kind: str, radius: float) -> list[tuple[float, float]]:
    """Vertices of a shape centred on the origin (before rotation)."""
    if kind == "square":
        r = radius * 0.8
        return [(-r, -r), (r, -r), (r, r), (-r, r)]
    if kind == "triangle":
        return [(radius * math.cos(a), radius * math.sin(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3
                                                                         for k in range(3))]
    if kind == "star":
        return [((radius if k % 2 == 0 else radius * 0.42) * math.cos(math.pi / 2 + k * math.pi / 5),
                 (radius if k % 2 == 0 else radius * 0.42) * math.sin(math.pi / 2 + k * math.pi / 5))
                for k in range(10)]
    if kind == "cross":
        a, b = radius, radius * 0.32
        return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
                (-b, -b)]
    if kind in ("hexagon", "pentagon"):
        sides = 6 if kind == "hexagon" else 5
        return [(radius * math.cos(math.pi / 2 + k * 2 * math.pi / sides),
                 radius * math.sin(math.pi / 2 + k * 2 * math.pi / sides)) for k in range(sides)]
    if kind == "diamond":
        return [(0, -radius), (radius * 0.5, 0), (0, radius), (-radius * 0.5, 0)]
    if kind == "arrow":
        a, b, head = radius, radius * 0.22, radius * 0.6
        return [(-a, -b), (a - head, -b), (a - head, -head), (a, 0), (a - head, head), (a - head, b), (-a, b)]
    if kind == "ellipse":
        return [(radius * math.cos(t), radius * 0.5 * math.sin(t)) for t in (k * 2 * math.pi / 48 for k in range(48))]
    raise ValueError(f"no polygon for {kind!r}")


def _shape_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A float mask (0..1) of one shape at a random position, scale and rotation, drawn 4x oversampled.

    The centre stays within 12 % of the middle: validation keeps the central (S)/(S+32) of the image (2/3 at
    64 px), and training's random crops then also hold the shape more often than the bare background.
    """
    scale = 4
    big = size * scale
    radius = rng.uniform(0.24, 0.36) * big
    cx, cy = big / 2 + rng.uniform(-0.12, 0.12, size=2) * big
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if kind in ("circle", "ring"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        if kind == "ring":
            inner = radius * rng.uniform(0.5, 0.7)
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif kind == "crescent":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        angle = rng.uniform(0, 2 * math.pi)
        bx, by = cx + 0.45 * radius * math.cos(angle), cy + 0.45 * radius * math.sin(angle)
        draw.ellipse([bx - radius, by - radius, bx + radius, by + radius], fill=0)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in _polygon(kind, radius)]
        draw.polygon(points, fill=255)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64) / 255.0


def _texture_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A 0/1 texture over the whole image with random period, phase and orientation."""
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(0.1, 0.18) * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + rng.uniform(0, period, size=(2, 1, 1))
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if kind == "stripes":
        return (np.sin(2 * math.pi * u / period) > 0).astype(np.float64)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)
    if kind == "dots":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        return (du ** 2 + dv ** 2 < (period * rng.uniform(0.22, 0.32)) ** 2).astype(np.float64)
    if kind == "waves":
        amplitude = rng.uniform(0.15, 0.3) * period
        wavelength = rng.uniform(1.5, 3.0) * period
        bent = u + amplitude * np.sin(2 * math.pi * v / wavelength)
        return (np.sin(2 * math.pi * bent / period) > 0).astype(np.float64)
    if kind == "grid":
        width = period * rng.uniform(0.2, 0.3)
        return (((u % period) < width) | ((v % period) < width)).astype(np.float64)
    if kind == "zigzag":
        triangle = np.abs((v / (2 * period)) % 1.0 - 0.5) * period
        return (np.sin(2 * math.pi * (u + triangle) / period) > 0).astype(np.float64)
    if kind == "concentric":
        cx, cy = rng.uniform(0, size, size=2)
        radius = np.hypot(np.arange(size)[None, :] - cx, np.arange(size)[:, None] - cy)
        return (np.sin(2 * math.pi * radius / period) > 0).astype(np.float64)
    if kind == "bricks":
        row = np.floor(v / period)
        along = u + row * period
        mortar = ((v % period) < period * 0.2) | ((along % (2 * period)) < period * 0.2)
        return mortar.astype(np.float64)
    raise ValueError(f"unknown texture {kind!r}")


def draw_image(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB image of class `kind`."""
    foreground, other = _distinct_colours(rng)
    if kind in SHAPES + TRANSFER_SHAPES:
        background = _background(rng, size, other)
        mask = _shape_mask(kind, rng, size)
    else:
        background = np.broadcast_to(other, (size, size, 3)) * rng.uniform(0.8, 1.2, size=(1, 1, 3))
        mask = _texture_mask(kind, rng, size)
    image = background * (1 - mask[..., None]) + foreground * mask[..., None]
    image += rng.normal(0, rng.uniform(3, 12), size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8), "RGB")


def _class_names(num_classes: int, class_set: str) -> list[str]:
    if class_set not in CLASS_SETS:
        raise ValueError(f"--class-set must be one of {', '.join(CLASS_SETS)}, got {class_set!r}")
    names = CLASS_SETS[class_set]
    if not 1 <= num_classes <= len(names):
        raise ValueError(f"--classes must be between 1 and {len(names)} ({', '.join(names)}), got {num_classes}")
    return list(names[:num_classes])


def _encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def generate_dataset(root: str | Path, num_classes: int = DEFAULT_CLASSES,
                     train_per_class: int = DEFAULT_TRAIN_PER_CLASS, val_per_class: int = DEFAULT_VAL_PER_CLASS,
                     image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0, class_set: str = "default",
                     progress: Callable[[str], None] | None = None) -> Path:
    """Write root/{train,val}/<class>/<class>_<n>.jpg; identical bytes for identical arguments. Returns root."""
    if image_size < 8:
        raise ValueError(f"--image-size must be at least 8, got {image_size}")
    if train_per_class < 0 or val_per_class < 0:
        raise ValueError("--train-per-class and --val-per-class must be >= 0")
    root = Path(root)
    for split_id, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for class_id, name in enumerate(_class_names(num_classes, class_set)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                # One stream per image: any image can be regenerated alone and counts do not shift others.
                rng = np.random.default_rng([seed, split_id, class_id, n])
                (folder / f"{name}_{n:05d}.jpg").write_bytes(_encode(draw_image(name, rng, image_size)))
            if progress:
                progress(f"{split}/{name}: {count} images")
    return root


def main(argv: list[str] | None = None) -> int:
    """CLI: write the dataset and print where it went."""
    p = ArgumentParser(prog="python -m image_classification.data.generated",
                                description="Write a procedurally drawn ImageNet-layout dataset "
                                            f"(classes: {', '.join(CLASS_NAMES)}; or with --class-set "
                                            f"transfer: {', '.join(CLASS_SETS['transfer'])}).")
    p.add_argument("--output", required=True, type=Path, help="dataset folder to write (train/ and val/)")
    p.add_argument("--classes", type=Number(int, low=1, high=len(CLASS_NAMES)), default=DEFAULT_CLASSES,
                   help="number of classes (default: %(default)s)")
    p.add_argument("--class-set", choices=sorted(CLASS_SETS), default="default",
                   help="which ten classes to draw from: transfer is a second set of other shapes and textures, "
                        "for fine-tuning a model trained on the default set (default: %(default)s)")
    p.add_argument("--train-per-class", type=Number(int, low=0), default=DEFAULT_TRAIN_PER_CLASS,
                   help="training images per class (default: %(default)s)")
    p.add_argument("--val-per-class", type=Number(int, low=0), default=DEFAULT_VAL_PER_CLASS,
                   help="validation images per class (default: %(default)s)")
    p.add_argument("--image-size", type=Number(int, low=8), default=DEFAULT_IMAGE_SIZE,
                   help="side of the square images in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed writes the same bytes (default: 0)")
    args = p.parse_args(argv)
    try:
        root = generate_dataset(args.output, args.classes, args.train_per_class, args.val_per_class,
                                args.image_size, args.seed, args.class_set)
    except (ValueError, OSError) as err:
        return print_error(p.prog, error_message(err))
    total = args.classes * (args.train_per_class + args.val_per_class)
    print(f"wrote {total} images of {args.classes} classes to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
