"""Setting a job up: model, loaders, loss, optimizer, features, and the state --resume restores; every check that
can refuse the run happens here, before a file is written (the report is kept in memory until the job begins)."""
from __future__ import annotations

import functools
import os
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import checkpoint as ckpt
from ..cli import UserError
from ..config import Config
from ..context import ExecutionContext
from ..data import val_loader_of
from ..data.erasing import RandomErasing
from ..features import FEATURES
from ..logger import DEFAULT, Logger
from ..metrics import TRAIN_METRICS, VAL_METRICS, all_reduce_sum
from ..models import get_entry
from ..toolkit import finetune, progressive
from ..trackers import build_trackers
from .checks import check_accumulation, check_evaluation, check_sync_bn, with_class_count
from .epoch import epoch_iterations
from .job import Job
from .losses import TrainingLoss, build_loss
from .optimizers import job_optimizer
from .resume import AUTO_RESUME, read_resume_checkpoint, resume_from, resume_path
from .state import RunState, Trainer

# prepare_model(config, model, train loader, ctx, logger): a step between building the model and compiling it, such
# as quant_main.py's calibration.
PrepareModel = Callable[[Config, nn.Module, object, ExecutionContext, Logger], object]


def setup_job(config: Config, ctx: ExecutionContext, prepare_model: PrepareModel | None = None) -> Job:
    """Build the job `config` describes and restore --resume. The job's config carries --resume as the file it
    resumed from (None for a fresh start), `auto` resolved."""
    resume = resume_path(config, ctx)
    fresh_auto_start = config.checkpoint.resume == AUTO_RESUME and resume is None
    if resume != config.checkpoint.resume:
        config = config.replace(resume=resume)
    saved = read_resume_checkpoint(resume, config) if resume else None
    check_sync_bn(config, ctx)
    accumulation = accumulation_steps(config.optim.optimizer_batch_size, config.data.batch_size, ctx.world_size)
    entry = get_entry(config.model.arch)
    schedule = progressive.progressive_schedule(config, entry.default_image_size)
    eval_size = eval_image_size(config, entry)
    trackers = build_trackers(config.log.tensorboard, config.log.mlflow, config.checkpoint.workspace) \
        if ctx.is_main_process else ()
    logger = Logger(Path(config.checkpoint.workspace) / config.log.raport_file, enabled=ctx.is_main_process,
                    append=bool(resume), deferred=True, trackers=trackers)
    config = with_class_count(config, saved, ctx, logger)  # before the flags are logged and the model is built
    log_parameters(logger, config, ctx)
    if fresh_auto_start:
        logger.print(f"=> --resume auto: no checkpoint at "
                     f"{Path(config.checkpoint.workspace) / config.checkpoint.filename}; starting fresh")
    model = entry(**config.model.params)
    finetune.prepare(model, config)
    if config.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    state = RunState(data_seed=shared_seed(ctx, config.runtime.seed))
    if saved is not None:
        # The data order of a resumed run comes from the checkpoint: its seed is needed by the loaders, and its
        # epoch decides the stage the train loader starts in.
        state.data_seed = int(saved.data_seed if saved.data_seed is not None else state.data_seed)
        state.epoch = int(saved.epoch)
    stage = schedule.settings(min(state.epoch, schedule.epochs - 1))
    train_loader = None if config.runtime.evaluate else progressive.stage_train_loader(config, ctx, stage,
                                                                                         state.data_seed)
    # Normalised as the arch's weights expect (ImageNet statistics, or EfficientNet-Lite's [-1, 1]).
    val_loader = None if config.runtime.training_only and not config.runtime.evaluate else val_loader_of(
        config.data, ctx, num_classes=config.model.num_classes, seed=state.data_seed, image_size=eval_size,
        **entry.preprocessing.normalization)
    if saved is not None:
        ckpt.check_classes(saved, resume, (train_loader if train_loader is not None else val_loader).classes)
    if train_loader is not None:
        logger.iterations_per_epoch = epoch_iterations(train_loader, config.runtime.prof)
    model = model.to(ctx.device, memory_format=ctx.memory_format)
    if prepare_model is not None:
        prepare_model(config, model, train_loader, ctx, logger)
    if config.model.jit != "no":
        # Compilation happens in the first steps (torch.compile) or before them (TorchScript): say why they are slow.
        logger.print(f"=> --jit {config.model.jit}: compiling {config.model.arch} with "
                     f"{'torch.compile' if config.model.jit == 'compile' else 'TorchScript'} (first steps take "
                     f"longer{'; each new input shape compiles again' if config.model.jit == 'compile' else ''})")
    train_model = compile_model(model, config.model.jit, frozen=config.runtime.evaluate)
    if not config.runtime.evaluate:  # evaluation all-reduces its metrics and needs no gradient synchronisation
        train_model = wrap_distributed(train_model, ctx)
    criterion = build_loss(config.loss.label_smoothing, schedule.max_mixup, schedule.max_cutmix).to(ctx.device)
    trainer = Trainer(ctx=ctx, model=model, train_model=train_model, loss=TrainingLoss(criterion),
                      scaler=ctx.grad_scaler(config.runtime.static_loss_scale), accumulation=accumulation,
                      optimizer=None if config.runtime.evaluate else job_optimizer(model, config),
                      erasing=RandomErasing(config.data.random_erasing) if config.data.random_erasing > 0 else None,
                      clip_grad=config.optim.clip_grad)
    job = Job(config=config, trainer=trainer, state=state, train_loader=train_loader, val_loader=val_loader,
              logger=logger)
    for name in FEATURES:
        feature = FEATURES.get(name).from_config(config, job)
        if feature is not None:
            job.features.append(feature)
    if saved is not None:
        resume_from(saved, resume, job)
    check_accumulation(job)
    check_evaluation(job)
    return job


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def shared_seed(ctx: ExecutionContext, seed: int | None) -> int:
    """`seed`, or one random seed agreed by all processes (the data order must be the same on every rank)."""
    if seed is not None:
        return seed
    value = torch.tensor([int.from_bytes(os.urandom(4), "little") if ctx.is_main_process else 0],
                         dtype=torch.int64, device=ctx.device)
    return int(all_reduce_sum(value).item())


def accumulation_steps(optimizer_batch_size: int, batch_size: int, world_size: int) -> int:
    """Iterations per optimizer step to reach --optimizer-batch-size; a clear error when it does not divide."""
    if optimizer_batch_size in (-1, None):
        return 1
    per_iteration = batch_size * world_size
    if optimizer_batch_size <= 0 or optimizer_batch_size % per_iteration:
        raise UserError(f"--optimizer-batch-size {optimizer_batch_size} must be a positive multiple of "
                        f"world size x batch size = {world_size} x {batch_size} = {per_iteration}")
    return optimizer_batch_size // per_iteration


def eval_image_size(config: Config, entry) -> int:
    """--eval-image-size, else --image-size, else the arch's evaluation size (EfficientNetV2 evaluates larger)."""
    size = config.data.eval_image_size or config.data.image_size or entry.default_eval_image_size
    if size < 1:
        raise UserError(f"--eval-image-size must be positive, got {size}")
    return size


def log_parameters(logger: Logger, config: Config, ctx: ExecutionContext) -> None:
    """The reference's start of a report: the flags with the process placement it adds to them, the model's flags
    as model.*, then the metrics (the features' among them: val_ema.* only with --use-ema, ...)."""
    params = config.plain()
    model_params = params.pop("model_args")
    params.update(distributed=ctx.distributed, local_rank=ctx.local_rank,
                  gpu=ctx.device.index if ctx.is_cuda else None, world_size=ctx.world_size)
    logger.log("PARAMETER", params, verbose=False)
    logger.log("PARAMETER", {f"model.{k}": v for k, v in model_params.items()}, verbose=False)
    added: dict[str, dict[str, int]] = {}
    for name in FEATURES:
        for prefix, metrics in FEATURES.get(name).metrics(config).items():
            added.setdefault(prefix, {}).update(metrics)
    # A feature's train.* losses (train.kd_loss) follow train.loss.
    prefixes = {"train": {"loss": DEFAULT, **added.pop("train", {}), **TRAIN_METRICS}, "val": VAL_METRICS, **added}
    for prefix, names in prefixes.items():
        logger.register_metrics(prefix, names)


def compile_model(model: nn.Module, jit: str, *, frozen: bool = False) -> nn.Module:
    """--jit: torch.jit.script or torch.compile; a clear error when the model cannot be scripted.

    `frozen` (main.py --evaluate, whose weights never change): torch.compile with inductor's freezing.
    """
    if jit == "no":
        return model
    if jit == "script":
        try:
            with warnings.catch_warnings():  # its deprecation notice speaks to us, not to the user who chose it
                warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
                scripted = torch.jit.script(model)
        except UserError:
            raise  # the model itself says what cannot be scripted (efficientnet-quant-*)
        except Exception as err:  # TorchScript reports many error types
            # Its message starts with an empty line; the first text line is the cause, the first `File "...",
            # line N` the model code it could not compile.
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            cause = lines[0].rstrip(" :") if lines else "no message"
            source = re.search(r'File "([^"]+)", line (\d+)', str(err))
            at = f" at {Path(source[1]).name}:{source[2]}" if source else ""
            raise UserError(f"--jit script: this model cannot be scripted ({type(err).__name__}: {cause}{at}); "
                            f"use --jit compile or --jit no") from None
        # The scripted model runs op by op in TorchScript's interpreter, as the eager model does, without the graph
        # executor's optimisations: under autocast they re-cast the graph by TorchScript's own rules (every add
        # and multiply in fp32, so bf16 results differ from eager's), and with that autocast pass switched off
        # their autodiff fails (a bf16 gradient meets an fp32 weight). Without them the eager autocast casts each
        # op as in eager mode. On a CPU, where TorchScript fuses nothing, b0 trains and infers as fast either way.
        # The executor reads the setting at every call, so it stays off for the process.
        torch._C._set_graph_executor_optimize(False)
        return scripted
    if jit == "compile":
        return FrozenCompiled(model) if frozen else torch.compile(model)
    raise UserError(f"--jit must be no, script or compile, got {jit!r}")


class FrozenCompiled(nn.Module):
    """torch.compile with inductor's freezing, for a model that only runs inference.

    Freezing compiles the weights in as constants: BN folds into the convolutions and, on CPU, oneDNN runs
    each conv with its SiLU fused and its weights packed once (b0 fp32 CPU inference 1.4-1.6x timm's and
    torchvision's eager speed, where compiling without it reached 1.2-1.4x). The weights must not change
    afterwards. inductor reads its `freezing` setting when it compiles, on the first call and again for each new
    input shape, and torch.compile's options= does not reach that point (torch 2.14 compiles such a model
    unfrozen), so every call runs under the setting.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.compiled = torch.compile(model)

    def forward(self, *args, **kwargs):
        import torch._inductor.config as inductor_config
        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def wrap_distributed(model: nn.Module, ctx: ExecutionContext) -> nn.Module:
    """DistributedDataParallel over the process group, for a multi-process run (the model itself otherwise)."""
    if not ctx.distributed:
        return model
    match_gradient_strides(model)
    device_ids = [ctx.device.index] if ctx.is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def match_gradient_strides(model: nn.Module) -> None:
    """Give each gradient its parameter's strides where the two differ only in dimensions of size 1.

    A stride of a size-1 dimension addresses nothing, so a depthwise weight [C, 1, k, k] (or a 1x1 conv's
    [O, I, 1, 1]) is channels_last and contiguous at once, under two sets of strides. Kernels pick either: with
    channels_last and bf16/fp16 autocast, the depthwise convolution's backward returns [k*k, k*k, k, 1] for a
    weight of [k*k, 1, k, 1]. Autograd's layout contract ignores size-1 dimensions and keeps such a gradient as it
    is, but DDP compares every stride with its bucket view (built from the parameter) and warns "Grad strides do
    not match bucket view strides" once per process. The gradient is re-viewed with the parameter's strides,
    without a copy: the same elements at the same addresses.
    """
    for param in model.parameters():
        if param.requires_grad and param.dim() > 1 and 1 in param.shape:
            param.register_hook(functools.partial(_with_strides_of, param.stride()))


def _with_strides_of(strides: tuple[int, ...], grad: torch.Tensor) -> torch.Tensor:
    if grad.layout != torch.strided or grad.stride() == strides:
        return grad
    if any(have != want for have, want, size in zip(grad.stride(), strides, grad.shape) if size != 1):
        return grad  # a layout that really differs: autograd copies it into the parameter's layout itself
    return grad.as_strided(grad.shape, strides, grad.storage_offset())
