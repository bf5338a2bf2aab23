"""What a job would otherwise do silently with settings that do not suit its data: each becomes the right default,
a `warning:` line or a one-line error, before the first step.

    config = with_class_count(config, saved, ctx, logger)   --num_classes from the weights or the data
    check_sync_bn(config, ctx)                              --sync-bn needs CUDA
    check_accumulation(job)                                 --optimizer-batch-size that completes few steps, or none
    check_evaluation(job)                                   --evaluate of random weights; --topk of every class

A loss that explodes in the first epoch (ImageNet's --lr and --bn_momentum on a few thousand images) is the
training feature of exploding_loss.py.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..checkpoint import Checkpoint
from ..cli import UserError
from ..config import Config
from ..context import ExecutionContext
from ..data import FILE_BACKENDS, dataset_class_names
from ..logger import Logger
from ..models.weights import classifier_classes, extract_state_dict, load_file

if TYPE_CHECKING:
    from .job import Job

# The number of classes of NVIDIA's published weights (--pretrained): ImageNet models, all of them.
NGC_CLASSES = 1000


def warn(ctx: ExecutionContext, text: str) -> None:
    """One `warning: <text>` line on stderr, from the main process."""
    if ctx.is_main_process:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def with_class_count(config: Config, saved: Checkpoint | None, ctx: ExecutionContext, logger: Logger) -> Config:
    """`config` with the model's class count settled, checked against the data's.

    --num_classes given: that number. Otherwise the class count of the weights the job continues from (--resume's
    checkpoint, or --pretrained / --pretrained-from-file without --reset-classifier), which the model must fit, else
    the data's (its class folders, or its shards' classes.txt: ImageNet's 1000 for the reference's command lines),
    else (synthetic data) the default of the parser or configs.yml. More outputs than the data has classes is an
    error when nothing but --num_classes asks for them, a warning when the weights bring them.
    """
    params = config.model.params
    data = None if config.data.data_backend not in FILE_BACKENDS else len(
        dataset_class_names(config.data.data, config.data.data_format))
    weights, source = _weights_classes(params, saved)
    count = params["num_classes"]
    if not config.model.num_classes_given:
        count = weights or data or count
    if data is not None and count > data:
        if weights != count:
            raise UserError(f"--num_classes {count}: {config.data.data} has {data} classes, so {count - data} of the "
                            f"model's outputs would never be a label; give --num_classes {data} or leave it out "
                            "(the default is the data's class count)")
        cure = (f"; to train a {data}-class head from them, add --reset-classifier" if source != "--resume" else "")
        warn(ctx, f"the model keeps the {count} classes of the {source} weights while {config.data.data} has {data} "
                  f"classes: its labels 0-{data - 1} stand for the weights' first {data}{cure}")
    elif data is not None and not config.model.num_classes_given and count == data != params["num_classes"]:
        logger.print(f"=> {count} classes, as {config.data.data} has (the model's class count defaults to the data's; "
                     "--num_classes N sets it)")
    return config if count == params["num_classes"] else config.replace(model_params={"num_classes": count})


def _weights_classes(params, saved: Checkpoint | None) -> tuple[int | None, str | None]:
    """(class count, flag) of the weights the model will be loaded with, or (None, None)."""
    if saved is not None:
        return classifier_classes(saved.state_dict), "--resume"
    if params.get("reset_classifier"):
        return None, None
    if params.get("pretrained"):
        return NGC_CLASSES, "--pretrained"
    path = params.get("pretrained_from_file")
    if path:
        return classifier_classes(extract_state_dict(load_file(path), source=str(path))), "--pretrained-from-file"
    return None, None


def check_sync_bn(config: Config, ctx: ExecutionContext) -> None:
    """--sync-bn on a machine without CUDA: one line (torch's SyncBatchNorm computes on GPUs only)."""
    if config.model.sync_bn and not ctx.is_cuda:
        raise UserError(f"--sync-bn: torch.nn.SyncBatchNorm runs on CUDA GPUs only, this run is on {ctx.device.type} "
                        "(BatchNorm in one process already sees its whole batch); drop --sync-bn")


def check_accumulation(job: Job) -> None:
    """--optimizer-batch-size that needs more iterations per optimizer step than an epoch has (configs.yml's 4096 with
    a small -b or a small dataset): a warning with the real numbers; an error when the whole schedule cannot complete
    one optimizer step (a warning with --prof, whose runs are benchmarks)."""
    trainer, config, state = job.trainer, job.config, job.state
    if job.train_loader is None or trainer.accumulation == 1:
        return
    per_epoch = len(job.train_loader)
    if config.runtime.prof > 0:
        per_epoch = min(per_epoch, config.runtime.prof)
    if trainer.accumulation <= per_epoch:
        return
    epochs, run_epochs = config.schedule.epochs, config.schedule.run_epochs
    last = epochs if run_epochs < 0 else min(epochs, state.epoch + run_epochs)

    def steps(until: int) -> int:  # optimizer steps until epoch `until`, from where the run starts
        iterations = state.accumulated + per_epoch * (until - state.epoch) - state.iteration
        return max(iterations, 0) // trainer.accumulation

    world = trainer.ctx.world_size
    numbers = (f"--optimizer-batch-size {config.optim.optimizer_batch_size} with -b {config.data.batch_size}"
               f"{f' on {world} processes' if world > 1 else ''}: 1 optimizer step every {trainer.accumulation} "
               f"iterations, {per_epoch} iterations per epoch: {per_epoch / trainer.accumulation:.2g} steps per epoch, "
               f"{_count(steps(last), 'step')} in this run")
    if steps(epochs) == 0 and config.runtime.prof <= 0:
        raise UserError(f"{numbers}, none in its {_count(epochs, 'epoch')}: lower --optimizer-batch-size (-1: no "
                        "accumulation) or raise -b")
    warn(trainer.ctx, f"{numbers}; lower --optimizer-batch-size (-1: no accumulation) for a step every epoch")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_evaluation(job: Job) -> None:
    """Validation that measures nothing: --evaluate of random weights (a warning), a top-k of every class (a note:
    the number is right, only trivial)."""
    config, ctx = job.config, job.ctx
    params = config.model.params
    if config.runtime.evaluate and not (config.checkpoint.resume or params.get("pretrained")
                                        or params.get("pretrained_from_file")):
        warn(ctx, f"--evaluate without --resume, --pretrained or --pretrained-from-file: this scores "
                  f"{config.model.arch}'s random initial weights")
    classes = config.model.num_classes
    if job.val_loader is not None and classes > 1 and config.log.topk >= classes:
        job.logger.print(f"=> --topk {config.log.topk} with {classes} classes: val.top5 counts the top {classes}, every "
                         f"class, so it is 100 % by definition; --topk {classes - 1} or lower measures something")


def effective_topk(config: Config) -> int:
    """--topk, at most the number of classes (the top-k of more classes than the model scores is its top-C)."""
    return min(config.log.topk, config.model.num_classes)
