#!/usr/bin/env python3
"""The training loop's overhead: launch.py's benchmark_training_short run (synthetic data) vs the bare step.

    .venv/bin/python bench/bench_e2e.py                          # b0, bs 32, 224, fp32, 30 iterations per run
    .venv/bin/python bench/bench_e2e.py --memory-format nhwc --compile --precision bf16
    .venv/bin/python bench/bench_e2e.py --quick --json /tmp/e.json

The end-to-end run is `launch.py --mode benchmark_training_short` in this process (configs.yml: synthetic
data, 1 epoch, print frequency 1, training only, no checkpoints; the EfficientNet recipe's RMSprop) with
--prof set to --iterations, an optimizer step every iteration (--optimizer-batch-size -1) and plain
cross-entropy (no label smoothing, no mixup) so that both sides compute
the same thing. Its throughput is taken from the report's elapsed times between the end of the warm-up
iterations and the last one, so it counts everything the loop does per iteration (data, step, metrics,
logging). The bare step is `train.epoch.train_step` on the same settings (bench_train.py's `ours` entry).
Both start from a fresh model and leave out the same --skip warm-up iterations; they alternate --repeats
times; overhead = 1 - e2e img/s / bare img/s, from the medians, and the paired overhead is the median of
that per repeat (each run beside the bare one that followed it). On a machine whose speed drifts by more
than the overhead, the exact number is `outside step`: within the same main.py iterations, the share of the
loop's time not spent in train.epoch.train_step (timed by wrapping it; on a GPU the wrapper drains the device
after each step).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_train import RMSPROP, make_step, recipe_lr  # noqa: E402
from image_classification.logger import read_report  # noqa: E402


def launch_argv(args: argparse.Namespace, arch: str, batch: int, size: int, workspace: Path) -> list[str]:
    """launch.py's command line for the bench's settings; flags after the config names override configs.yml."""
    argv = ["--model", f"efficientnet-{arch}", "--precision", {"fp32": "FP32", "tf32": "TF32"}.get(args.precision, "AMP"),
            "--mode", "benchmark_training_short", "--platform", args.platform,
            "--prof", str(args.iterations), "-b", str(batch), "--image-size", str(size),
            "--workspace", str(workspace), "--raport-file", "raport.json",
            "--optimizer", "rmsprop", "--lr", str(recipe_lr(batch)), "--momentum", str(RMSPROP["momentum"]),
            "--wd", str(RMSPROP["weight_decay"]), "--rmsprop-alpha", str(RMSPROP["rmsprop_alpha"]),
            "--rmsprop-eps", str(RMSPROP["rmsprop_eps"]), "--label-smoothing", "0", "--mixup", "0",
            # The recipe accumulates to 4096 images per optimizer step; the bare step steps every iteration.
            "--optimizer-batch-size", "-1",
            "--memory-format", args.memory_format, "--jit", "compile" if args.compile else "no", "--seed", "0"]
    if args.device != "auto":
        argv += ["--device", args.device]
    return argv


def loop_window(report: Path, skip: int) -> tuple[int, float]:
    """(iterations, seconds) between the log of iteration `skip` and the last iteration of epoch 0."""
    times = {}
    for record in read_report(report):
        step = record.get("step")  # METADATA records have none
        if record["type"] == "LOG" and isinstance(step, list) and len(step) == 2 and step[0] == 0:
            times[int(step[1])] = float(record["elapsedtime"])
    last = max(times)
    if skip >= last:
        raise ValueError(f"--iterations {last} must exceed --skip {skip}")
    return last - skip, times[last] - times[skip]


class StepTimer:
    """Wraps train.epoch.train_step while main.py runs: the seconds of each call, the device drained after it."""

    def __init__(self, ctx):
        from image_classification.train import epoch
        self.ctx, self.training, self.seconds = ctx, epoch, []

    def __enter__(self) -> "StepTimer":
        step = self.original = self.training.train_step

        def timed_step(*args, **kwargs):
            start = time.perf_counter()
            out = step(*args, **kwargs)
            self.ctx.synchronize()
            self.seconds.append(time.perf_counter() - start)
            return out
        self.training.train_step = timed_step
        return self

    def __exit__(self, *exc) -> None:
        self.training.train_step = self.original


def run(args: argparse.Namespace) -> dict:
    from image_classification.launcher import build_args
    from image_classification.config import Config
    from image_classification.train import run as train_main
    ctx = common.context_from_args(args)
    entry = common.parse_entries("ours", args.memory_format, args.compile)[0]
    rows = []
    for arch in common.csv_list(args.archs):
        size = args.image_size or common.default_image_size(arch)
        for batch in common.csv_list(args.batch_sizes, int):
            images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(ctx.device)
            target = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1)).to(ctx.device)
            timed_steps = args.iterations - args.skip
            # The process's first steps also grow the C library's heap (under --cpu-allocator retain, for about
            # 8 steps of b0): an untimed bare run first, so that neither side's first sample pays for it.
            step, _ = make_step(entry, arch, ctx, images, target)
            common.warm_up(step, ctx, args.iterations)
            del step
            e2e, bare, outside = [], [], []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory(prefix="bench_e2e_") as workspace:
                    # main.py prints a line per iteration here (print frequency 1): keep the table readable.
                    with contextlib.redirect_stdout(io.StringIO()), StepTimer(ctx) as steps:
                        train_main(Config.from_args(build_args(launch_argv(args, arch, batch, size, Path(workspace)))))
                    iterations, seconds = loop_window(Path(workspace) / "raport.json", args.skip)
                    e2e.append(iterations * batch / seconds)
                    # Of the same iterations: the share of the loop's time spent outside the training step.
                    outside.append(1.0 - sum(steps.seconds[args.skip:args.skip + iterations]) / seconds)
                # The bare side starts as the run does: a fresh model, the same warm-up iterations left out.
                step, _ = make_step(entry, arch, ctx, images, target)
                common.warm_up(step, ctx, args.skip)
                bare.append(batch / common.timed(lambda: [step() for _ in range(timed_steps)], ctx) * timed_steps)
            e2e_ips, bare_ips = common.median(e2e), common.median(bare)
            rows.append({"arch": arch, "batch_size": batch, "image_size": size, "precision": args.precision,
                         **common.entry_record(entry), "e2e_img_per_s": e2e_ips, "bare_img_per_s": bare_ips,
                         "e2e_samples": e2e, "bare_samples": bare, "overhead": 1.0 - e2e_ips / bare_ips,
                         "paired_overhead": common.median([1.0 - e / b for e, b in zip(e2e, bare)]),
                         "outside_step": common.median(outside), "outside_step_samples": outside,
                         "iterations": args.iterations, "skipped": args.skip})
    return {"benchmark": "e2e_training", "machine": common.machine_info(ctx), "settings": common.settings(args, ctx),
            "results": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(p, default_models="ours", default_batch_sizes="32")
    p.add_argument("--iterations", type=int, default=30, help="iterations per main.py run (its --prof)")
    p.add_argument("--skip", type=int, default=5, help="first iterations of each run left out as warm-up")
    p.add_argument("--platform", default=None,
                   help="configs.yml platform (default: CPU on the CPU, DGXA100 on a GPU)")
    p.set_defaults(repeats=3)
    args = p.parse_args(argv)
    common.apply_quick(args, p)
    if args.quick:
        args.iterations, args.skip = 6, 2
    if args.platform is None:
        args.platform = "DGXA100" if args.device.startswith("cuda") or (args.device == "auto" and
                                                                       torch.cuda.is_available()) else "CPU"
    if args.models != "ours":
        p.error("--models: bench_e2e.py measures our loop only (ours)")
    try:
        report = run(args)
    except ValueError as err:
        p.error(str(err))
    common.print_table(report["results"], [
        ("arch", "arch", ""), ("batch_size", "batch", "d"), ("image_size", "size", "d"), ("precision", "prec", ""),
        ("model", "model", ""), ("e2e_img_per_s", "launch.py img/s", ".2f"), ("bare_img_per_s", "bare step img/s", ".2f"),
        ("overhead", "overhead", ".1%"), ("paired_overhead", "paired", ".1%"),
        ("outside_step", "outside step", ".2%")],
        f"training loop vs bare step, {report['machine']['device']}, median of {args.repeats}")
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
