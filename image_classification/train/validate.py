"""Validation: loss, top-1 and top-k (all-reduced over processes), throughput and per-batch latency."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..context import ExecutionContext
from ..logger import Logger, Progress
from ..metrics import SumMeter, percentile, topk_correct
from ..toolkit.tta import with_tta
from .checks import effective_topk
from .confusion import ConfusionMatrix
from .epoch import count


@dataclass(frozen=True)
class EvalOptions:
    """How a validation pass runs and reports."""

    prof: int = -1          # at most this many batches (-1: all)
    topk: int = 5           # the second accuracy, reported as top5 (at most the number of classes)
    print_freq: int = 10    # a record every N batches
    tta: str = "none"       # test-time augmentation

    @classmethod
    def from_config(cls, config: Config) -> "EvalOptions":
        return cls(prof=config.runtime.prof, topk=effective_topk(config), print_freq=config.log.print_freq,
                   tta=config.data.tta)


@torch.no_grad()
def validate(model: nn.Module, loader, ctx: ExecutionContext, logger: Logger, options: EvalOptions, *,
             prefix: str = "val", step: tuple[int, ...] = (0, 0), criterion: nn.Module | None = None,
             confusion: ConfusionMatrix | None = None) -> dict[str, float]:
    """Loss, top-1 and top-k (all-reduced), throughput and per-batch compute latency (mean and percentiles), of
    `model` as --tta evaluates it.

    The loss is `criterion`'s in eval mode, as the reference validates with its training criterion (label smoothing
    kept; mixup's soft-target loss is cross-entropy on the labels there), or cross-entropy without one.
    `confusion` collects the top-1 predictions per class.
    """
    model = with_tta(model, options.tta)
    model.eval()
    if criterion is not None:
        criterion.eval()
    loader.set_epoch(step[0])
    length = len(loader) if options.prof <= 0 else min(len(loader), options.prof)
    meter = SumMeter(["loss", "top1", "top5"], ctx.device)
    interval_meter = SumMeter(meter.names, ctx.device)
    latencies: list[float] = []
    batch_sizes: list[int] = []
    data_times: list[float] = []
    images_seen = 0
    progress = Progress(prefix, length, enabled=ctx.is_main_process)
    start = interval_start = data_start = time.perf_counter()
    for i, (images, target) in enumerate(itertools.islice(loader, length)):
        data_times.append(time.perf_counter() - data_start)
        compute_start = time.perf_counter()
        with ctx.autocast():
            output = model(images)
        loss = F.cross_entropy(output.float(), target, reduction="sum") if criterion is None \
            else criterion(output.float(), target) * images.shape[0]
        correct = topk_correct(output, target, (1, options.topk))
        if confusion is not None:
            confusion.add(output, target)
        sums = torch.cat([loss.view(1).double(), correct.double()])
        meter.add(sums, images.shape[0])
        interval_meter.add(sums, images.shape[0])
        ctx.synchronize()  # latency is the thing measured here
        latencies.append(time.perf_counter() - compute_start)
        batch_sizes.append(images.shape[0])
        images_seen += images.shape[0]
        progress.update(i, images.shape[0])
        if (i + 1) % options.print_freq == 0:
            # This process's batches since the last record (the reference's per-iteration meters); the epoch
            # record below is over every process.
            done = len(latencies) - options.print_freq
            images = sum(batch_sizes[done:])
            logger.log((*step, i + 1), validation_metrics(
                prefix, interval_meter.averages(distributed=False), latencies[done:], images, total_images=images,
                data_time=sum(data_times[done:]) / options.print_freq, elapsed=time.perf_counter() - interval_start,
                quantiles=(100, 99, 95)))
            interval_meter.reset()
            interval_start = time.perf_counter()
        data_start = time.perf_counter()
    progress.close()
    elapsed = time.perf_counter() - start
    averages = meter.averages(ctx.distributed)
    # The first batch pays for warm-up (cuDNN's algorithm search, torch.compile, lazy allocation): reported
    # apart, and compute speed and latencies are those of the batches after it (all of them when only one ran).
    first = latencies[0] if latencies else 0.0
    steady, steady_images = (latencies[1:], sum(batch_sizes[1:])) if len(latencies) > 1 else (latencies, images_seen)
    return {
        **validation_metrics(prefix, averages, steady, steady_images * ctx.world_size,
                             total_images=images_seen * ctx.world_size,
                             data_time=sum(data_times) / max(len(latencies), 1), elapsed=elapsed,
                             quantiles=(100, 99, 95, 90)),
        f"{prefix}.first_batch_latency": first,
        f"{prefix}.bad_files": count(loader.epoch_bad_files, ctx),
    }


def validation_metrics(prefix: str, averages: dict[str, float], latencies: list[float], images: int, *,
                       total_images: int, data_time: float, elapsed: float, quantiles: tuple[int, ...]
                       ) -> dict[str, float]:
    """Accuracy and loss (`averages`), then speed: compute speed and latency (mean and `quantiles`) of the batches
    timed in `latencies`, holding `images` images; total speed of `total_images` over `elapsed` seconds;
    `data_time` per batch."""
    compute = sum(latencies)
    metrics = {
        f"{prefix}.top1": 100.0 * averages["top1"],
        f"{prefix}.top5": 100.0 * averages["top5"],
        f"{prefix}.loss": averages["loss"],
        f"{prefix}.compute_ips": images / compute if compute > 0 else 0.0,
        f"{prefix}.total_ips": total_images / elapsed if elapsed > 0 else 0.0,
        f"{prefix}.data_time": data_time,
        f"{prefix}.compute_latency": compute / max(len(latencies), 1),
    }
    for q in quantiles:
        metrics[f"{prefix}.compute_latency_at{q}"] = percentile(latencies, q)
    return metrics
