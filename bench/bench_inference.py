#!/usr/bin/env python3
"""Inference throughput and latency (p50/p95/p99) of ours, timm and torchvision at several batch sizes.

    .venv/bin/python bench/bench_inference.py                               # b0, bs 1,8,32, 224, fp32
    .venv/bin/python bench/bench_inference.py --models ours,ours+nhwc+compile,timm,torchvision --precision bf16
    .venv/bin/python bench/bench_inference.py --quick --json /tmp/i.json   # seconds; checks the script works

Every entry runs `model.eval()` under `torch.inference_mode()` and the context's autocast, as main.py's
validation does (with --evaluate). Batches are interleaved across entries; each latency sample is one
forward pass, the device drained before and after.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def make_forward(entry: common.Entry, arch: str, ctx, images: torch.Tensor):
    """A function running one inference batch of the entry's model."""
    ctx = common.context_for(ctx, entry)
    model = common.build_model(entry, arch).to(ctx.device, memory_format=ctx.memory_format).eval()
    net = common.maybe_compile(model, entry)
    images = images.contiguous(memory_format=ctx.memory_format)

    def forward():
        with torch.inference_mode(), ctx.autocast():
            return net(images)
    return forward


def run(args: argparse.Namespace) -> dict:
    ctx = common.context_from_args(args)
    entries = common.parse_entries(args.models, args.memory_format, args.compile, allow_freeze=True)
    rows = []
    for arch in common.csv_list(args.archs):
        size = args.image_size or common.default_image_size(arch)
        for batch in common.csv_list(args.batch_sizes, int):
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(ctx.device)
            forwards, first = {}, {}
            for entry in entries:
                forwards[entry.label] = make_forward(entry, arch, ctx, images)
                first[entry.label] = common.warm_up(forwards[entry.label], ctx, max(args.warmup, 1))
            samples = common.interleaved(forwards, ctx, args.repeats)
            memory = {}
            for label, forward in forwards.items():
                with common.PeakMemory(ctx) as peak:
                    forward()
                memory[label] = peak.mib
            for entry in entries:
                times = samples[entry.label]
                rows.append({"arch": arch, "batch_size": batch, "image_size": size, "precision": args.precision,
                             **common.entry_record(entry), "img_per_s": batch / common.median(times),
                             **{f"latency_ms_p{q}": 1e3 * common.percentile(times, q) for q in (50, 95, 99)},
                             "first_call_s": first[entry.label], "samples_s": times,
                             "peak_memory_mib": memory[entry.label]})
            del forwards
    return {"benchmark": "inference", "machine": common.machine_info(ctx), "settings": common.settings(args, ctx),
            "results": rows, "ratios": common.ratios(rows, "img_per_s", ("arch", "batch_size")),
            "best": common.best_ratios(rows, "img_per_s", ("arch", "batch_size"))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(p, default_models="ours,timm,torchvision", default_batch_sizes="1,8,32")
    p.set_defaults(repeats=20, warmup=3)
    args = p.parse_args(argv)
    common.apply_quick(args, p)
    try:
        report = run(args)
    except ValueError as err:
        p.error(str(err))
    common.print_table(report["results"], [
        ("arch", "arch", ""), ("batch_size", "batch", "d"), ("image_size", "size", "d"), ("precision", "prec", ""),
        ("model", "model", ""), ("img_per_s", "img/s", ".1f"), ("latency_ms_p50", "p50 ms", ".2f"),
        ("latency_ms_p95", "p95 ms", ".2f"), ("latency_ms_p99", "p99 ms", ".2f"),
        ("first_call_s", "1st call s", ".1f"), ("peak_memory_mib", "peak MiB", ".0f")],
        f"inference, {report['machine']['device']} ({report['machine']['cpu']}, "
        f"{report['machine']['torch_threads']} threads), {args.repeats} interleaved samples")
    common.print_ratio_tables(report)
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
