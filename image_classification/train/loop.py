"""The job: train epoch by epoch (or --evaluate once), with checkpoints, early stopping, stop signals and the
run summary.

    run(config)                   the whole job in a process group of its own; returns the run summary
      setup_job                   model, loaders, optimizer, features, resume (setup.py)
      evaluate                    --evaluate: one validation
      fit                         the epochs: LR, train_one_epoch (epoch.py), validate, checkpoints, stopping
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import CONFIG_FILE, Config, write_config_file
from ..context import create_context, set_cpu_allocator
from ..gpu_affinity import set_affinity
from ..models import fused
from .banner import banner_lines
from .confusion import ConfusionMatrix, report_confusion
from .epoch import train_one_epoch
from .job import Job
from .schedules import LRSchedule, set_lr
from .setup import PrepareModel, seed_everything, setup_job
from .state import StopRequest

# How a metric is summarised over epochs in the run summary (step []), as DLLogger's aggregators.
SUMMARY_BEST = {"top1": max, "top5": max, "loss": min}


def run(config: Config, *, prepare_model: PrepareModel | None = None) -> dict:
    """Run the job main.py describes (train + validate, or --evaluate) and return the summary metrics.

    The summary's "interrupted" is True when SIGTERM/SIGINT stopped the run (its checkpoint written).
    """
    runtime = config.runtime
    ctx = create_context(device=None if runtime.device == "auto" else runtime.device, amp=runtime.amp,
                         memory_format=config.model.memory_format, allow_tf32=runtime.tf32,
                         dist_backend=runtime.dist_backend)
    with ctx:
        if not ctx.is_cuda and not set_cpu_allocator(runtime.cpu_allocator) and ctx.is_main_process:
            warnings.warn(f"--cpu-allocator {runtime.cpu_allocator} needs glibc; this C library keeps its own "
                          "defaults", stacklevel=2)
        fused.set_enabled(runtime.cpu_kernels == "auto")
        set_affinity(runtime.gpu_affinity, ctx)
        if runtime.seed is not None:
            seed_everything(runtime.seed + ctx.local_rank)
        job = setup_job(config, ctx, prepare_model)
        for line in banner_lines(job):
            job.logger.print(line)
        with job.logger, job, StopRequest() as stop:
            job.logger.begin()
            if ctx.is_main_process:
                write_config_file(config, Path(config.checkpoint.workspace) / CONFIG_FILE)
            checkpoints = job.config.checkpoint
            if ctx.is_main_process and checkpoints.save_checkpoints and not runtime.evaluate:
                job.writer = ckpt.CheckpointWriter(checkpoints.workspace, filename=checkpoints.filename,
                                                   keep_last=checkpoints.gather_checkpoints)
                ckpt.write_class_names(checkpoints.workspace, job.classes)
            return evaluate(job) if runtime.evaluate else fit(job, stop)


def evaluate(job: Job) -> dict:
    """--evaluate: validate the model (and the features' models, e.g. its EMA) once; the summary of that record."""
    epoch = job.state.epoch
    confusion = ConfusionMatrix(job.config.model.num_classes, job.ctx)
    record = job.validate_all(step=(epoch, 0), confusion=confusion)
    job.logger.log((epoch,), record)
    report_confusion(job, confusion, epoch)
    result = summary([record])
    job.logger.log((), result)
    return result


def fit(job: Job, stop: StopRequest) -> dict:
    """Epochs from the run state's to --epochs (or --run-epochs of them); stops early on patience or a signal."""
    config, trainer, state, logger = job.config, job.trainer, job.state, job.logger
    schedule = LRSchedule.from_config(config)
    epochs, run_epochs = config.schedule.epochs, config.schedule.run_epochs
    last_epoch = epochs if run_epochs < 0 else min(epochs, state.epoch + run_epochs)
    prof, patience = config.runtime.prof, config.schedule.early_stopping_patience
    interrupted = stopped_early = False
    validated: tuple[int, ConfusionMatrix] | None = None  # the last validation's epoch and predictions per class
    while state.epoch < last_epoch:
        epoch = state.epoch
        lr = schedule.lr_of(epoch)
        for feature in job.features:
            lr = feature.epoch_lr(job, epoch, lr)
        set_lr(trainer.optimizer, lr)
        record = train_one_epoch(job, epoch, stop)
        if state.iteration:
            # Stopped mid-epoch by a signal: save where we are and leave. The epoch's record is logged once, by
            # the run that finishes it.
            interrupted = True
            job.save_checkpoint(is_best=False)
            logger.print(f"=> stopped by signal at epoch {epoch} iteration {state.iteration}; "
                         + (f"saved {job.writer.latest}; continue with --resume {job.writer.latest}"
                            if job.writer is not None else "no checkpoint (--no-checkpoints)"))
            break
        for feature in job.features:
            feature.end_epoch(job, epoch, record)
        is_best = False
        if job.val_loader is not None:
            # The reference's validation steps carry the epoch's training iteration count (--prof shortens it).
            length = len(job.train_loader)
            validated = epoch, ConfusionMatrix(config.model.num_classes, trainer.ctx)
            record.update(job.validate_all(step=(epoch, length if prof <= 0 else min(length, prof)),
                                           confusion=validated[1]))
            is_best = record["val.top1"] > state.best_prec1 or not state.validated
            if is_best:
                state.best_prec1 = record["val.top1"]
                state.validated = True
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
        for feature in job.features:
            feature.epoch_record(job, epoch, record)
        logger.log((epoch,), record)
        state.history.append(record)
        state.epoch = epoch + 1
        job.save_checkpoint(is_best=is_best)
        logger.flush()
        if patience > 0 and job.val_loader is not None and state.epochs_without_improvement >= patience:
            logger.print(f"=> early stopping: no better val top-1 for {state.epochs_without_improvement} epochs")
            stopped_early = True
            break
        if stop.agreed(trainer.ctx):
            interrupted = True
            logger.print(f"=> stopped by signal after epoch {epoch}"
                         + (f"; continue with --resume {job.writer.latest}" if job.writer is not None else ""))
            break
    if not interrupted and validated is not None:
        report_confusion(job, validated[1], validated[0])
    result = summary(state.history)
    if not interrupted and (stopped_early or state.epoch >= epochs):
        for feature in job.features:
            result.update(feature.end_run(job))
    if not interrupted:  # an interrupted run is summarised by the run that finishes it
        logger.log((), result)
    return {**result, "best_prec1": state.best_prec1, "epoch": state.epoch, "interrupted": interrupted}


def summary(history: list[dict]) -> dict[str, float]:
    """Run summary over the epoch records: best top-1/top-5, lowest loss, mean throughput/times, last LR."""
    result: dict[str, float] = {}
    for key in dict.fromkeys(k for record in history for k in record):
        values = [r[key] for r in history if key in r and isinstance(r[key], (int, float))
                  and not (isinstance(r[key], float) and math.isnan(r[key]))]
        if not values:
            continue
        name = key.split(".")[-1]
        if name in SUMMARY_BEST:
            result[key] = SUMMARY_BEST[name](values)
        elif name in ("lr", "grad_scale", "image_size"):
            result[key] = values[-1]
        elif name == "bad_files":  # unreadable images met over the run (a bad file counts once per epoch)
            result[key] = int(sum(values))
        else:
            result[key] = sum(values) / len(values)
    return result
