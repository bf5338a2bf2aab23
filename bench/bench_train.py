#!/usr/bin/env python3
"""Training-step throughput: our model through main.py's own step vs timm and torchvision in a plain loop.

    .venv/bin/python bench/bench_train.py                                   # b0, bs 32, 224, fp32, CPU or GPU
    .venv/bin/python bench/bench_train.py --archs b0,b4 --batch-sizes 32 --precision bf16 --json train.json
    .venv/bin/python bench/bench_train.py --models ours,ours+nhwc+compile,timm,torchvision
    .venv/bin/python bench/bench_train.py --quick --json /tmp/t.json       # seconds; checks the script works

Ours runs `image_classification.train.epoch.train_step` (autocast, loss, scaled backward, RMSprop step,
zero_grad(set_to_none)) on an `Engine` built as main.py builds it. The peers run the same semantics in a
plain loop: same optimizer (RMSprop over the reference's parameter groups, the EfficientNet recipe's
hyper-parameters), same loss (cross-entropy), same inputs. Each entry owns its model and optimizer; steps
are interleaved round by round and the median step time gives img/s.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from image_classification.train.optimizers import build_optimizer  # noqa: E402
from image_classification.train.epoch import train_step  # noqa: E402
from image_classification.train.losses import TrainingLoss  # noqa: E402
from image_classification.train.state import Trainer  # noqa: E402

# The EfficientNet recipe of configs.yml (spec §2): RMSprop alpha 0.9, eps 0.01, momentum 0.9; b0's lr/wd.
RMSPROP = dict(optimizer="rmsprop", lr=0.08, momentum=0.9, weight_decay=1e-5, rmsprop_alpha=0.9, rmsprop_eps=0.01)
RECIPE_BATCH = 4096  # the recipe's lr is for --optimizer-batch-size 4096


def recipe_lr(batch: int) -> float:
    """The recipe's lr scaled to `batch`. At the unscaled 0.08, repeating one random batch makes the weights
    diverge within a few steps, and overflowing or denormal values would time something else than training."""
    return RMSPROP["lr"] * batch / RECIPE_BATCH


def make_step(entry: common.Entry, arch: str, ctx, images: torch.Tensor, target: torch.Tensor):
    """(step function, model) for one entry; the step runs one full training iteration."""
    ctx = common.context_for(ctx, entry)
    model = common.build_model(entry, arch).to(ctx.device, memory_format=ctx.memory_format).train()
    images = images.contiguous(memory_format=ctx.memory_format)
    optimizer = build_optimizer(model, **{**RMSPROP, "lr": recipe_lr(images.shape[0])})
    criterion = nn.CrossEntropyLoss()
    net = common.maybe_compile(model, entry)
    if entry.is_ours:
        engine = Trainer(ctx=ctx, model=model, train_model=net, loss=TrainingLoss(criterion), optimizer=optimizer,
                         scaler=ctx.grad_scaler(128.0))

        def step():
            return train_step(engine, images, target, optimizer_step=True)
        step = common.with_kernels(entry, step)
    else:
        scaler = ctx.grad_scaler(128.0)

        def step():
            with ctx.autocast():
                loss = criterion(net(images), target)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            return loss
    return step, model


def run(args: argparse.Namespace) -> dict:
    ctx = common.context_from_args(args)
    entries = common.parse_entries(args.models, args.memory_format, args.compile)
    rows = []
    for arch in common.csv_list(args.archs):
        size = args.image_size or common.default_image_size(arch)
        for batch in common.csv_list(args.batch_sizes, int):
            generator = torch.Generator().manual_seed(0)
            images = torch.randn(batch, 3, size, size, generator=generator).to(ctx.device)
            target = torch.randint(0, 1000, (batch,), generator=generator).to(ctx.device)
            steps, first = {}, {}
            for entry in entries:
                step, _ = make_step(entry, arch, ctx, images, target)
                first[entry.label] = common.warm_up(step, ctx, max(args.warmup, 1))
                steps[entry.label] = step
            samples = common.interleaved(steps, ctx, args.repeats)
            memory = {}
            for label, step in steps.items():  # one extra step each, alone, for its peak memory
                with common.PeakMemory(ctx) as peak:
                    step()
                memory[label] = peak.mib
            for entry in entries:
                times = samples[entry.label]
                med = common.median(times)
                rows.append({"arch": arch, "batch_size": batch, "image_size": size, "precision": args.precision,
                             **common.entry_record(entry), "img_per_s": batch / med, "step_ms_median": 1e3 * med,
                             "step_ms_min": 1e3 * min(times), "step_ms_max": 1e3 * max(times),
                             "first_step_s": first[entry.label], "samples_s": times,
                             "peak_memory_mib": memory[entry.label]})
            del steps
    return {"benchmark": "train_step", "machine": common.machine_info(ctx), "settings": common.settings(args, ctx),
            "results": rows, "best_ratios": common.best_ratios(rows, "img_per_s", ("arch", "batch_size")),
            "same_config_ratios": common.same_config_ratios(rows, "img_per_s", ("arch", "batch_size")),
            "ratios": common.ratios(rows, "img_per_s", ("arch", "batch_size"))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(p, default_models="ours,timm,torchvision", default_batch_sizes="32")
    args = p.parse_args(argv)
    common.apply_quick(args, p)
    try:
        report = run(args)
    except ValueError as err:
        p.error(str(err))
    common.print_ratio_tables(report)
    common.print_table(report["results"], [
        ("arch", "arch", ""), ("batch_size", "batch", "d"), ("image_size", "size", "d"), ("precision", "prec", ""),
        ("model", "model", ""), ("img_per_s", "img/s", ".2f"), ("step_ms_median", "step ms", ".1f"),
        ("step_ms_min", "min", ".1f"), ("step_ms_max", "max", ".1f"), ("first_step_s", "1st step s", ".1f"),
        ("peak_memory_mib", "peak MiB", ".0f")],
        f"training step, {report['machine']['device']} ({report['machine']['cpu']}, "
        f"{report['machine']['torch_threads']} threads), median of {args.repeats}")
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
