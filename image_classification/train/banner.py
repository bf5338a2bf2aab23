"""The start-up banner: what a run is about to do, in a few lines, before its first step (rank 0 prints it).

    => efficientnet-b0: 5,288,548 parameters, 10 classes; cpu (2 threads), fp32, memory format nchw, --jit no
    => data: data/generated (pytorch backend, 2 workers per process): train 1,000 images, val 200 images; ...
    => batch 32 per process x 1 process x accumulation 1 = 32 images per optimizer step
    => 20 epochs of 31 iterations (from epoch 0); lr 0.08, cosine schedule, warmup 2 epochs
    => workspace: /home/me/ws (report raport.json, checkpoints on)
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data import FILE_BACKENDS
from ..models import get_entry
from ..toolkit.progressive import progressive_schedule
from ..trackers import mlflow_tracking_uri
from .setup import eval_image_size

if TYPE_CHECKING:
    from ..context import ExecutionContext
    from .job import Job


def count(number: int, noun: str) -> str:
    """'1 epoch', '20 epochs', '1,000 images'."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def precision(ctx: ExecutionContext, static_loss_scale: float, tf32: bool) -> str:
    """The run's arithmetic in words: AMP's autocast type and loss scaling, or fp32 (with TF32 where it applies)."""
    if ctx.amp:
        return (f"AMP (fp16 autocast, loss scale from {static_loss_scale:g})" if ctx.is_cuda
                else "AMP (bf16 autocast)")
    return "fp32 (TF32 matmuls and convolutions)" if ctx.is_cuda and tf32 else "fp32"


def device_line(ctx: ExecutionContext) -> str:
    """The device, its name on a GPU, and the CPU threads of this process."""
    name = f" ({torch.cuda.get_device_name(ctx.device)})" if ctx.is_cuda else ""
    processes = f", {ctx.world_size} processes" if ctx.distributed else ""
    return f"{ctx.device}{name}, {count(torch.get_num_threads(), 'thread')} per process{processes}"


def _images(loader, ctx: ExecutionContext) -> str:
    images = count(loader.num_samples, "image")
    return f"{images} per process" if ctx.distributed else images


def banner_lines(job: Job) -> list[str]:
    """The banner of a set-up job (see the module's docstring)."""
    config, ctx = job.config, job.ctx
    parameters = sum(p.numel() for p in job.trainer.model.parameters())
    lines = [f"=> {config.model.arch}: {parameters:,} parameters, {len(job.classes)} classes; {device_line(ctx)}; "
             f"{precision(ctx, config.runtime.static_loss_scale, config.runtime.tf32)}, memory format "
             f"{config.model.memory_format}, --jit {config.model.jit}"]
    data = config.data
    source = f"{data.data_backend} data" if data.data_backend not in FILE_BACKENDS else \
        f"{data.data} ({data.data_backend} backend, {count(data.workers, 'worker')} per process)"
    splits = [f"{name} {_images(loader, ctx)}" for name, loader in (("train", job.train_loader),
                                                                     ("val", job.val_loader)) if loader is not None]
    entry = get_entry(config.model.arch)
    sizes = [f"eval size {eval_image_size(config, entry)}"] if job.val_loader is not None else []
    if job.train_loader is not None:
        schedule = progressive_schedule(config, entry.default_image_size)
        sizes.insert(0, f"train size {schedule.settings(min(job.state.epoch, schedule.epochs - 1)).image_size}")
    lines.append(f"=> data: {source}: {', '.join(splits)}; {', '.join(sizes)}")
    if not config.runtime.evaluate:
        accumulation = job.trainer.accumulation
        lines.append(f"=> batch {data.batch_size} per process x {ctx.world_size} "
                     f"process{'es' if ctx.distributed else ''} x accumulation {accumulation} = "
                     f"{data.batch_size * ctx.world_size * accumulation:,} images per optimizer step")
        schedule = config.schedule
        run_epochs = f", at most {schedule.run_epochs} in this run" if schedule.run_epochs > 0 else ""
        iterations = count(job.logger.iterations_per_epoch, "iteration")
        lines.append(f"=> {count(schedule.epochs, 'epoch')} of {iterations} (from epoch "
                     f"{job.state.epoch}{run_epochs}); lr {config.optim.lr:g}, {config.optim.optimizer}, "
                     f"{schedule.lr_schedule} schedule, warmup {count(schedule.warmup, 'epoch')}")
    else:
        lines.append(f"=> --evaluate: one validation pass, batch {data.batch_size} per process")
    checkpoints = config.checkpoint
    trackers = [f"tensorboard {config.log.tensorboard}" if config.log.tensorboard is not None else "",
                f"mlflow {mlflow_tracking_uri(config.log.mlflow, checkpoints.workspace)}"
                if config.log.mlflow is not None else ""]
    saving = "checkpoints on" if checkpoints.save_checkpoints and not config.runtime.evaluate else "no checkpoints"
    lines.append(f"=> workspace: {Path(checkpoints.workspace).resolve()} (report {config.log.raport_file}, {saving}"
                 + "".join(f", {t}" for t in trackers if t) + ")")
    return lines
