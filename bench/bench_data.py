#!/usr/bin/env python3
"""Training-pipeline throughput (images/second) of every data backend, side by side, on one JPEG folder and
on the same images as WebDataset tar shards.

    .venv/bin/python bench/bench_data.py                          # generated dataset, 224 px, 2 workers
    .venv/bin/python bench/bench_data.py --data /imagenet --shards /imagenet-shards --workers 8 --batches 50
    .venv/bin/python bench/bench_data.py --data-format folder     # folder rows only
    .venv/bin/python bench/bench_data.py --quick                  # tiny run (the test suite runs this)

Rows: pytorch, dali-cpu, dali-gpu (only with a GPU), synthetic, and a plain torchvision ImageFolder +
DataLoader baseline with the same training augmentation (float ToTensor + Normalize in the workers, as
most training scripts do). Columns: the folder, and the shards of the same images (--shards, or converted
from --data into a temporary folder); the file-based backends read both in alternating rounds (--rounds).
Every measurement times whole batches delivered on the device after one warm-up epoch start, so worker
start-up and DALI pipeline builds are excluded. Prints a table, then JSON (folder rows under the backend's name,
shard rows under "<backend>/shards").
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from image_classification.context import ExecutionContext, select_device  # noqa: E402
from image_classification.data import AUGMENTATIONS, DATA_FORMATS, build_train_loader, dataset_classes  # noqa: E402
from image_classification.data.generated import generate_dataset  # noqa: E402
from image_classification.data.loader import MEAN, STD  # noqa: E402
from image_classification.data.pytorch_backend import augmentation_policy, interpolation_mode  # noqa: E402
from image_classification.data.shard_format import read_index  # noqa: E402
from image_classification.data.shards import convert  # noqa: E402

FORMATS = DATA_FORMATS[1:]  # folder, shards


def baseline_loader(data: Path, args, ctx: ExecutionContext):
    """torchvision ImageFolder + DataLoader, the way a plain training script would write it."""
    from torchvision import datasets, transforms as T
    mode = interpolation_mode(args.interpolation)
    transform = T.Compose([
        T.RandomResizedCrop(args.image_size, interpolation=mode, antialias=True),
        T.RandomHorizontalFlip(),
        *augmentation_policy(args.augmentation, 9, mode),
        T.ToTensor(),
        T.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD]),
    ])
    dataset = datasets.ImageFolder(str(data / "train"), transform=transform)
    options = dict(persistent_workers=True, prefetch_factor=args.prefetch) if args.workers > 0 else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, pin_memory=ctx.pin_memory(), **options)

    def batches():
        for images, labels in loader:
            yield (ctx.to_device(images).contiguous(memory_format=ctx.memory_format), ctx.to_device(labels))
    return loader, batches


def measure(batches_of_epoch, num_batches: int, ctx: ExecutionContext) -> tuple[float, int]:
    """(images/second, images timed) over up to `num_batches` batches, cycling epochs, after one warm-up batch."""
    iterator = iter(batches_of_epoch())
    next(iterator)  # workers started, pipeline built, first batch decoded
    images = done = 0
    start = time.perf_counter()
    while done < num_batches:
        for batch_images, _ in iterator:
            images += batch_images.shape[0]
            done += 1
            if done >= num_batches:
                break
        else:
            iterator = iter(batches_of_epoch())
    ctx.synchronize()
    return images / (time.perf_counter() - start), images


def our_loader(backend: str, data: Path, data_format: str, num_classes: int, args, ctx: ExecutionContext):
    loader = build_train_loader(backend, str(data), image_size=args.image_size, batch_size=args.batch_size, ctx=ctx,
                                num_classes=num_classes, workers=args.workers, prefetch=args.prefetch,
                                interpolation=args.interpolation, augmentation=args.augmentation, seed=0,
                                data_format=data_format)
    epochs = iter(range(10**9))

    def batches():
        loader.set_epoch(next(epochs))
        return iter(loader)
    return loader, batches


def run(args) -> dict[str, dict]:
    ctx = ExecutionContext(device=select_device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = generate_dataset(Path(tmp) / "data", num_classes=10, train_per_class=args.images_per_class,
                                    val_per_class=1, image_size=args.source_size, seed=0)
        sources = {"folder": data}
        if "shards" in args.data_format:
            sources["shards"] = args.shards
            if args.shards is None:
                sources["shards"] = Path(tmp) / "shards"
                convert(data, sources["shards"], splits=["train"], shard_size=args.shard_size, progress=False)
        num_classes = max(len(dataset_classes(data)), 1)
        if args.shards is not None:
            num_classes = read_index(args.shards)["num_classes"]
        backends = ["pytorch", "dali-cpu", *(["dali-gpu"] if ctx.is_cuda else [])]
        # A backend's folder and shard loaders are timed in alternating rounds, so that load from other
        # processes on a shared machine falls on both alike.
        groups = [[(name, data_format) for data_format in args.data_format] for name in backends]
        groups += [[("synthetic", "folder")], [("imagefolder-baseline", "folder")]]
        results: dict[str, dict] = {}
        for group in groups:
            loaders = {}
            for name, data_format in group:
                label = name if data_format == "folder" else f"{name}/{data_format}"
                loaders[label] = baseline_loader(data, args, ctx)[1] if name == "imagefolder-baseline" \
                    else our_loader(name, sources[data_format], data_format, num_classes, args, ctx)[1]
            timed = {label: [0, 0.0] for label in loaders}  # images, seconds
            for _ in range(args.rounds if len(loaders) > 1 else 1):
                for label, batches in loaders.items():
                    ips, images = measure(batches, max(1, args.batches // args.rounds), ctx)
                    timed[label][0] += images
                    timed[label][1] += images / ips
            for label, (images, seconds) in timed.items():
                results[label] = {"images_per_second": round(images / seconds, 1), "images": images}
                print(f"  {label:22s} {images / seconds:10.1f} img/s", file=sys.stderr, flush=True)
    return results


def formats(text: str) -> list[str]:
    """--data-format's value: folder, shards or both, comma-separated."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(name not in FORMATS for name in names):
        raise argparse.ArgumentTypeError(f"must be folder, shards or folder,shards, got {text!r}")
    return list(dict.fromkeys(names))


def print_table(results: dict[str, dict], data_formats: list[str]) -> None:
    """One row per backend, a column per data format, and shards/folder when both were measured."""
    both = data_formats == list(FORMATS)
    print(f"{'backend':24s}" + "".join(f"{name + ' img/s':>16s}" for name in data_formats)
          + (f"{'shards/folder':>16s}" if both else ""))
    for name in dict.fromkeys(label.split("/")[0] for label in results):
        values = [results.get(name if f == "folder" else f"{name}/{f}", {}).get("images_per_second")
                  for f in data_formats]
        cells = "".join(f"{value:16.1f}" if value is not None else f"{'-':>16s}" for value in values)
        if both:
            cells += f"{values[1] / values[0]:16.2f}" if None not in values else f"{'-':>16s}"
        print(f"{name:24s}{cells}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="dataset with train/<class>/* (default: generate one)")
    p.add_argument("--data-format", type=formats, default=list(FORMATS),
                   help="what to read the images from: folder, shards, or both (default: folder,shards)")
    p.add_argument("--shards", type=Path, default=None,
                   help="the shards of --data (python -m image_classification.data.shards); default: --data "
                        "converted into a temporary folder")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="samples per shard when converting --data here (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="training crop size (default: %(default)s)")
    p.add_argument("--source-size", type=int, default=320, help="side of generated images (default: %(default)s)")
    p.add_argument("--images-per-class", type=int, default=100, help="generated images per class (default: 100)")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="batch size (default: %(default)s)")
    p.add_argument("-j", "--workers", type=int, default=2, help="loader workers / DALI threads (default: 2)")
    p.add_argument("--prefetch", type=int, default=2, help="prefetch factor / DALI queue depth (default: 2)")
    p.add_argument("--batches", type=int, default=30, help="batches timed per backend (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating rounds over which a backend's folder and shard timings are split "
                        "(default: %(default)s)")
    p.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic", "triangular"))
    p.add_argument("--augmentation", default=None, choices=[name for name in AUGMENTATIONS if name is not None])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds; checks that the bench runs")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.shards is not None and "shards" not in args.data_format:
        p.error("--shards is read only with --data-format shards or folder,shards")
    if args.shards is not None and args.data is None:
        p.error("--shards needs --data, the same images as a folder (for the folder and baseline rows)")
    if args.quick:
        args.image_size, args.source_size, args.images_per_class = 32, 48, 4
        args.batch_size, args.batches, args.workers, args.shard_size, args.rounds = 4, 3, 1, 10, 1
    results = run(args)
    print(f"\ntrain pipeline, {args.image_size} px, batch {args.batch_size}, workers {args.workers}, "
          f"augmentation {args.augmentation}")
    print_table(results, args.data_format)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(json.dumps({"settings": settings, "results": results}, indent=1))
    common.write_json(args.json, {"benchmark": "data", "settings": settings, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
