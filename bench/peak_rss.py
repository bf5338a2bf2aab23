#!/usr/bin/env python3
"""Peak resident memory (RSS) of one bench_inference.py entry, run alone in this process.

    .venv/bin/python bench/peak_rss.py --entry ours+openvino --onnx b0.onnx --batch-size 32 --image-size 224
    .venv/bin/python bench/peak_rss.py --entry timm+nhwc+freeze --arch b0 --batch-size 32 --image-size 224

Prints one JSON line, {"entry": ..., "peak_rss_mib": ...}: the process's peak RSS (VmHWM of /proc/self/status)
after building the entry and running `--calls` batches. Not getrusage's ru_maxrss: Linux carries that over
from the forked parent across exec, so a child of a large bench process would report the parent's peak. An
engine entry (+onnxruntime, +openvino) loads the ONNX file that bench_inference.py exported and imports no
PyTorch, as a deployment of that engine would not; a PyTorch entry builds and (with +freeze) compiles its model
as bench_inference.py does.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def engine_entry(args: argparse.Namespace):
    import numpy as np

    from image_classification.deploy.engines import open_engine
    engine = open_engine(args.entry.split("+")[1], args.onnx, args.threads)
    images = np.random.default_rng(0).standard_normal((args.batch_size, 3, args.image_size, args.image_size),
                                                      dtype=np.float32)
    return lambda: engine.run(images)


def torch_entry(args: argparse.Namespace):
    import torch

    import bench_inference
    import common
    flags = ["--device", "cpu", "--cpu-allocator", args.cpu_allocator] + (["--threads", str(args.threads)]
                                                                          if args.threads else [])
    parser = argparse.ArgumentParser()
    common.add_common_arguments(parser, default_models=args.entry, default_batch_sizes=str(args.batch_size))
    ctx = common.context_from_args(parser.parse_args(flags))
    (entry,) = common.parse_entries(args.entry, "nchw", False, allow_freeze=True)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(0))
    forward, _ = bench_inference.make_forward(entry, args.arch, ctx, images, Path("."))
    return forward


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (the kernel's high-water mark of its own address space)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line (peak RSS is measured on Linux only)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entry", required=True, help="a bench_inference.py --models entry, e.g. ours+openvino+int8")
    p.add_argument("--onnx", type=Path, default=None, help="the exported file an engine entry runs")
    p.add_argument("--arch", default="b0", help="EfficientNet member of a PyTorch entry (default: %(default)s)")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--calls", type=int, default=5, help="batches to run (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="threads of the engine or torch (default: every core)")
    p.add_argument("--cpu-allocator", default="retain", help="a PyTorch entry's allocator, as bench_inference.py's")
    args = p.parse_args(argv)
    is_engine = any(f"+{name}" in args.entry for name in ("onnxruntime", "openvino"))
    if is_engine and args.onnx is None:
        p.error(f"--entry {args.entry} runs an ONNX file: give --onnx")
    forward = engine_entry(args) if is_engine else torch_entry(args)
    for _ in range(args.calls):
        forward()
    result = {"entry": args.entry, "peak_rss_mib": peak_rss_mib(), "torch_imported": "torch" in sys.modules}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
