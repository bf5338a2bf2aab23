"""One training epoch: forward, loss, backward, the (accumulated) optimizer step, the features' hooks, the log.

Per step nothing waits for the device: the losses stay tensors until print frequency, where the interval's
record is written (and the divergence guard reads the loss).
"""
from __future__ import annotations

import contextlib
import itertools
import time
from typing import TYPE_CHECKING

import torch

from ..context import ExecutionContext
from ..features import Step
from ..logger import Progress
from ..metrics import SumMeter, all_reduce_sum
from .schedules import base_lr
from .state import StopRequest, Trainer

if TYPE_CHECKING:
    from .job import Job

SIGNAL_CHECK_EVERY = 20  # distributed runs agree on a stop request every N iterations (the reference's bound)


def train_one_epoch(job: Job, epoch: int, stop: StopRequest) -> dict[str, float]:
    """One epoch of job.train_loader (from `state.iteration` on); returns its averaged train.* metrics. A stop
    request ends it early with `state.iteration` at the next batch (0 when the epoch is complete)."""
    trainer, state, config = job.trainer, job.state, job.config
    ctx = trainer.ctx
    trainer.train_model.train()
    trainer.loss.criterion.train()
    for feature in job.features:
        feature.start_epoch(job, epoch)
    loader = job.train_loader  # a feature may have replaced it (a new stage's image size)
    start_iteration = state.iteration
    loader.set_epoch(epoch, skip_batches=start_iteration)
    length = epoch_iterations(loader, config.runtime.prof)
    names = ["loss", *trainer.loss.terms]
    epoch_meter = SumMeter(names, ctx.device)
    if start_iteration and state.epoch_meter is not None:  # resumed mid-epoch: the epoch's loss sums so far
        epoch_meter.load_state_dict(state.epoch_meter)
    state.epoch_meter = None
    interval = _Interval(names, ctx)
    epoch_images = iterations = 0
    epoch_data_time = 0.0
    epoch_start = time.perf_counter()
    stopped = False
    print_freq = config.log.print_freq
    progress = Progress(f"train {epoch}", length, enabled=ctx.is_main_process)
    data_start = time.perf_counter()
    iteration = start_iteration - 1
    for iteration, (images, target) in enumerate(itertools.islice(loader, max(length - start_iteration, 0)),
                                                 start=start_iteration):
        data_time = time.perf_counter() - data_start
        batch = images.shape[0]
        optimizer_step = state.accumulated + 1 == trainer.accumulation
        losses = train_step(trainer, images, target, optimizer_step)
        state.accumulated = 0 if optimizer_step else state.accumulated + 1
        state.optimizer_steps += optimizer_step
        weighted = losses * batch
        epoch_meter.add(weighted, batch)
        interval.add(weighted, batch, data_time)
        epoch_images += batch
        epoch_data_time += data_time
        iterations += 1
        progress.update(iteration - start_iteration, batch)
        logged = None
        if (iteration + 1) % print_freq == 0:  # the reference's records; the epoch's end checks its own loss
            logged = interval.log(job, epoch, iteration + 1)
        for feature in job.features:
            feature.after_step(job, Step(epoch, iteration, optimizer_step, logged))
        if iteration + 1 < length and _should_check_stop(ctx, iteration) and stop.agreed(ctx):
            stopped = True
            break
        data_start = time.perf_counter()
    progress.close()
    state.iteration = iteration + 1 if stopped else 0
    ctx.synchronize()
    elapsed = time.perf_counter() - epoch_start
    if stopped:
        state.epoch_meter = epoch_meter.state_dict()
    return {
        **{f"train.{name}": value for name, value in epoch_meter.averages(ctx.distributed).items()},
        **throughput("train", epoch_images * ctx.world_size, iterations, elapsed, epoch_data_time),
        "train.lr": base_lr(trainer.optimizer),
        "train.grad_scale": grad_scale(trainer),
        "train.bad_files": count(loader.epoch_bad_files, ctx),
    }


def epoch_iterations(loader, prof: int) -> int:
    """The training iterations of an epoch as run: the loader's batches, at most --prof of them."""
    return len(loader) if prof <= 0 else min(len(loader), prof)


def train_step(trainer: Trainer, images: torch.Tensor, target: torch.Tensor, optimizer_step: bool) -> torch.Tensor:
    """Forward and backward of one batch; the optimizer steps when `optimizer_step` (end of an accumulation).
    Returns [loss, *loss terms] divided by the accumulation: the reference's train.loss (and the terms beside it)."""
    if trainer.erasing is not None:
        images = trainer.erasing(images)
    if trainer.mixup is not None:
        images, target = trainer.mixup(images, target)
    # DDP skips the gradient all-reduce on iterations that only accumulate.
    sync = contextlib.nullcontext() if optimizer_step or not hasattr(trainer.train_model, "no_sync") \
        else trainer.train_model.no_sync()
    with sync:
        with trainer.ctx.autocast():
            # One expression, so the logits are freed before backward (only the loss's own saved tensors stay).
            loss = trainer.loss(trainer.train_model(images), target, images) / trainer.accumulation
        trainer.scaler.scale(loss).backward()
    if optimizer_step:
        if trainer.clip_grad is not None:
            clip_gradients(trainer)
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        trainer.optimizer.zero_grad(set_to_none=True)
    terms = [term / trainer.accumulation for term in trainer.loss.last_terms()]
    return torch.stack([loss.detach(), *terms]) if terms else loss.detach().view(1)


def clip_gradients(trainer: Trainer) -> torch.Tensor:
    """--clip-grad: scale the gradients so that their global norm is at most trainer.clip_grad, after taking the
    fp16 loss scale out (the scaler's step then uses them as they are); returns the norm before clipping."""
    trainer.scaler.unscale_(trainer.optimizer)
    return torch.nn.utils.clip_grad_norm_([p for p in trainer.model.parameters() if p.grad is not None],
                                          trainer.clip_grad)


class _Interval:
    """The losses, images and data time since the last log record."""

    def __init__(self, names: list[str], ctx: ExecutionContext) -> None:
        self.ctx = ctx
        self.meter = SumMeter(names, ctx.device)
        self._reset()

    def _reset(self) -> None:
        self.meter.reset()
        self.images, self.iterations, self.data_time = 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, weighted: torch.Tensor, batch: int, data_time: float) -> None:
        self.meter.add(weighted, batch)
        self.images += batch
        self.iterations += 1
        self.data_time += data_time

    def log(self, job: Job, epoch: int, iteration: int) -> float:
        """Write the interval's record (step [epoch, iteration]) and start the next; returns its train.loss."""
        self.ctx.synchronize()
        elapsed = time.perf_counter() - self.start
        losses = self.meter.averages(self.ctx.distributed)
        job.logger.log((epoch, iteration), {
            **{f"train.{name}": value for name, value in losses.items()},
            **throughput("train", self.images * self.ctx.world_size, self.iterations, elapsed, self.data_time),
            "train.lr": base_lr(job.trainer.optimizer),
            "train.grad_scale": grad_scale(job.trainer),
        })
        self._reset()
        return losses["loss"]


def grad_scale(trainer: Trainer) -> float:
    return trainer.scaler.get_scale() if trainer.scaler.is_enabled() else 1.0


def count(value: int, ctx: ExecutionContext) -> int:
    """`value` summed over all processes."""
    if not ctx.distributed:
        return int(value)
    return int(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)).item())


def _should_check_stop(ctx: ExecutionContext, iteration: int) -> bool:
    """Whether to ask for a stop after `iteration`: every iteration, or every SIGNAL_CHECK_EVERY iterations where
    asking is a collective. A stop may fall between the batches of an accumulated step (their gradients are
    saved)."""
    return not ctx.distributed or (iteration + 1) % SIGNAL_CHECK_EVERY == 0


def throughput(prefix: str, images: int, iterations: int, elapsed: float, data_time: float) -> dict[str, float]:
    """total_ips, compute_ips, data_time and compute_time (the last two per iteration)."""
    compute = max(elapsed - data_time, 1e-12)
    return {
        f"{prefix}.total_ips": images / elapsed if elapsed > 0 else 0.0,
        f"{prefix}.compute_ips": images / compute,
        f"{prefix}.data_time": data_time / max(iterations, 1),
        f"{prefix}.compute_time": compute / max(iterations, 1),
    }
