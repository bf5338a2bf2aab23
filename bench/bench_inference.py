#!/usr/bin/env python3
"""Inference throughput and latency (p50/p95/p99) of ours, timm and torchvision at several batch sizes.

    .venv/bin/python bench/bench_inference.py                               # b0, bs 1,8,32, 224, fp32
    .venv/bin/python bench/bench_inference.py --models ours,ours+nhwc+compile,timm,torchvision --precision bf16
    .venv/bin/python bench/bench_inference.py --quick --json /tmp/i.json   # seconds; checks the script works
    .venv/bin/python bench/bench_inference.py --batch-sizes 1,32 --peak-rss --models \
        ours+nhwc+freeze,ours+onnxruntime,ours+openvino,ours+openvino+int8,timm+nhwc+freeze,torchvision+nhwc+freeze
    .venv/bin/python bench/bench_inference.py --archs lite0 --batch-sizes 1,32 --models ours+nhwc+freeze,\
ours+onnxruntime,ours+openvino,ours+openvino+int8,timm+nhwc+freeze,timm+onnxruntime,timm+openvino  # vs tf_*_lite0

Every PyTorch entry runs `model.eval()` under `torch.inference_mode()` and the context's autocast, as main.py's
validation does (with --evaluate). Engine entries (+onnxruntime, +openvino) export the model with
model2onnx.py's exporter and run the file in that engine (image_classification/engines.py, the engines of
classify.py --engine); +int8 exports efficientnet-quant-<arch> (random weights, calibrated on random images:
speed does not depend on the values) as model2onnx.py --fold-batchnorm does. Batches are interleaved
across entries; each latency sample is one forward pass, the device drained before and after.

Tables, in this order: our fastest entry against the peers' fastest, per precision (best vs best); each of our
entries against the peers in the same configuration; every entry's numbers; the engines' settings; plain
`ours` against plain peers (default vs default). --peak-rss adds each entry's process peak RSS, measured by
bench/peak_rss.py in a process of its own that runs nothing else (an engine's process imports no PyTorch).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def make_forward(entry: common.Entry, arch: str, ctx, images: torch.Tensor, workdir: Path,
                 threads: int | None = None):
    """A function running one inference batch of the entry's model, and the engine's settings (None for torch)."""
    if entry.engine != "torch":
        return engine_forward(entry, arch, images, workdir, threads)
    ctx = common.context_for(ctx, entry)
    model = common.build_model(entry, arch).to(ctx.device, memory_format=ctx.memory_format).eval()
    net = common.maybe_compile(model, entry)
    images = images.contiguous(memory_format=ctx.memory_format)

    def forward():
        with torch.inference_mode(), ctx.autocast():
            return net(images)
    return forward, None


def export_entry(entry: common.Entry, arch: str, image_size: int, workdir: Path, calibration: torch.Tensor) -> Path:
    """The entry's model as ONNX in `workdir` (once per entry and size): float, or our Q/DQ INT8 file."""
    from image_classification.deploy.export import export_onnx
    path = workdir / f"{entry.name}_{arch}_{image_size}{'_int8' if entry.int8 else ''}.onnx"
    if path.exists():
        return path
    if entry.int8:
        model = int8_model(arch, calibration)
    else:
        model = common.build_model(entry, arch).eval()
    export_onnx(model, path, image_size=image_size)
    return path


def int8_model(arch: str, images: torch.Tensor) -> torch.nn.Module:
    """efficientnet-quant-<arch> with BN statistics of `images`, calibrated on them, BN folded for export."""
    from image_classification.deploy.batchnorm_folding import fold_batchnorm
    from image_classification.models import get_entry
    from image_classification.toolkit.quantization import calibrate
    torch.manual_seed(0)
    model = get_entry(f"efficientnet-quant-{arch}")()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
    with torch.no_grad():
        model.train()(images)
    calibrate(model, [images], num_batches=1, calibrator="max")
    return fold_batchnorm(model)


def engine_forward(entry: common.Entry, arch: str, images: torch.Tensor, workdir: Path, threads: int | None):
    """A function running one batch of the entry's ONNX export in its engine, and the engine's settings."""
    from image_classification.deploy.engines import open_engine
    size = images.shape[-1]
    # Calibration's own batch of 4: BatchNorm's batch statistics need more than one value per channel.
    calibration = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    path = export_entry(entry, arch, size, workdir, calibration)
    engine = open_engine(entry.engine, path, threads)
    batch = images.cpu().numpy()
    settings = engine.describe(tuple(batch.shape)) if entry.engine == "openvino" else engine.describe()
    return (lambda: engine.run(batch)), {"onnx": path.name, **settings}


def peak_rss(entry: common.Entry, arch: str, batch: int, size: int, args: argparse.Namespace,
             onnx: Path | None) -> float:
    """MiB of the entry's process peak RSS running `args.warmup + args.repeats` batches alone (bench/peak_rss.py)."""
    command = [sys.executable, str(Path(__file__).with_name("peak_rss.py")), "--entry", entry.label, "--arch", arch,
               "--batch-size", str(batch), "--image-size", str(size), "--calls", str(args.warmup + args.repeats),
               "--cpu-allocator", args.cpu_allocator]
    if onnx is not None:
        command += ["--onnx", str(onnx)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"peak_rss.py {entry.label} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def run(args: argparse.Namespace) -> dict:
    ctx = common.context_from_args(args)
    entries = common.parse_entries(args.models, args.memory_format, args.compile, allow_freeze=True)
    if args.precision not in ("fp32", "tf32") and any(e.engine != "torch" for e in entries):
        raise ValueError(f"--precision {args.precision}: engine entries run the ONNX file in float32 (+int8: INT8)")
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        rows = measure(args, ctx, entries, Path(tmp))
    ratio_group = ("arch", "batch_size")
    return {"benchmark": "inference", "machine": common.machine_info(ctx), "settings": common.settings(args, ctx),
            "results": rows, "best_ratios": common.best_ratios(rows, "img_per_s", ratio_group),
            "same_config_ratios": common.same_config_ratios(rows, "img_per_s", ratio_group),
            "ratios": common.ratios(rows, "img_per_s", ratio_group)}


def measure(args: argparse.Namespace, ctx, entries: list[common.Entry], workdir: Path) -> list[dict]:
    rows = []
    for arch in common.csv_list(args.archs):
        size = args.image_size or common.default_image_size(arch)
        for batch in common.csv_list(args.batch_sizes, int):
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(ctx.device)
            forwards, first, engine_settings = {}, {}, {}
            for entry in entries:
                forwards[entry.label], engine_settings[entry.label] = make_forward(entry, arch, ctx, images, workdir,
                                                                                   args.threads)
                first[entry.label] = common.warm_up(forwards[entry.label], ctx, max(args.warmup, 1))
            samples = common.interleaved(forwards, ctx, args.repeats)
            memory = {}
            for entry in entries:
                if entry.engine != "torch":  # the profiler sees PyTorch's allocations only: --peak-rss measures these
                    memory[entry.label] = None
                    continue
                with common.PeakMemory(ctx) as peak:
                    forwards[entry.label]()
                memory[entry.label] = peak.mib
            del forwards
            for entry in entries:
                times = samples[entry.label]
                rows.append({"arch": arch, "batch_size": batch, "image_size": size,
                             "precision": "int8" if entry.int8 else args.precision,
                             **common.entry_record(entry), "img_per_s": batch / common.median(times),
                             **{f"latency_ms_p{q}": 1e3 * common.percentile(times, q) for q in (50, 95, 99)},
                             "first_call_s": first[entry.label], "samples_s": times,
                             "peak_memory_mib": memory[entry.label], "engine_settings": engine_settings[entry.label],
                             "peak_rss_mib": None})
                if args.peak_rss:
                    onnx = workdir / engine_settings[entry.label]["onnx"] if engine_settings[entry.label] else None
                    rows[-1]["peak_rss_mib"] = peak_rss(entry, arch, batch, size, args, onnx)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(p, default_models="ours,timm,torchvision", default_batch_sizes="1,8,32")
    p.add_argument("--peak-rss", action="store_true",
                   help="also measure each entry's process peak RSS, alone in a process of its own (bench/peak_rss.py)")
    p.set_defaults(repeats=20, warmup=3)
    args = p.parse_args(argv)
    common.apply_quick(args, p)
    try:
        report = run(args)
    except ValueError as err:
        p.error(str(err))
    common.print_ratio_tables(report)
    common.print_table(report["results"], [
        ("arch", "arch", ""), ("batch_size", "batch", "d"), ("image_size", "size", "d"), ("precision", "prec", ""),
        ("model", "model", ""), ("img_per_s", "img/s", ".1f"), ("latency_ms_p50", "p50 ms", ".2f"),
        ("latency_ms_p95", "p95 ms", ".2f"), ("latency_ms_p99", "p99 ms", ".2f"),
        ("first_call_s", "1st call s", ".1f"), ("peak_memory_mib", "peak MiB", ".0f"),
        ("peak_rss_mib", "peak RSS MiB", ".0f")],
        f"inference, {report['machine']['device']} ({report['machine']['cpu']}, "
        f"{report['machine']['torch_threads']} threads), {args.repeats} interleaved samples; peak MiB: PyTorch's "
        "tensors (profiler), peak RSS: the entry's process alone")
    engines = [{"model": r["model"], "batch_size": r["batch_size"],
                "settings": ", ".join(f"{k} {v}" for k, v in r["engine_settings"].items()
                                      if k not in ("onnx", "engine"))}
               for r in report["results"] if r["engine_settings"]]
    common.print_table(engines, [("model", "model", ""), ("batch_size", "batch", "d"), ("settings", "settings", "")],
                       "engine settings")
    defaults = [r for r in report["ratios"] if "+" not in r["ours"] + r["peer"]]
    common.print_table(defaults, common.RATIO_COLUMNS, "default vs default: " + common.RATIO_TITLE)
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
