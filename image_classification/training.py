"""The training engine behind main.py: build everything from the flags, then train/validate epoch by epoch.

    main(args)                    the whole job; returns the run summary
      setup_run                   model, loaders, optimizer, resume: everything checked before a file is written
      evaluate                    --evaluate: one validation
      train                       the epochs: stages, LR, train_one_epoch, validate, checkpoints, stopping
        enter_stage               progressive training: the stage's train loader and mixing strengths
        train_one_epoch           forward, loss, backward, (accumulated) optimizer step, EMA, log
        validate                  loss, top-1/top-k, throughput and latency percentiles
        save_checkpoint           the reference's checkpoint files, atomically, with every rank's resume state
        finish_swa                --swa-start: BN statistics of the weight average, its validation, model_swa.pth.tar

Device, precision and memory format come from one `ExecutionContext`; the loop never asks torch.cuda.
Per step nothing waits for the device: metrics stay tensors until print frequency, where a loss that is no
longer finite also stops the run (divergence.py).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import random
import re
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import distillation, finetune
from .cli import UserError
from .context import ExecutionContext, create_context, set_cpu_allocator
from .divergence import DivergenceGuard, causes_for
from .ema import EMA
from .gpu_affinity import set_affinity
from .logger import DEFAULT, VERBOSE, Logger, Progress
from .losses import build_loss
from .lr_schedule import schedule_from_args, set_lr
from .metrics import SumMeter, all_reduce_sum, percentile, topk_correct
from .mixup import Mixup
from .models import fused, get_entry
from .models.weights import fit_state_dict
from .optimizers import optimizer_from_args
from .progressive import ProgressiveSchedule, StageSettings, progressive_schedule
from .swa import SWA, SWA_FILE, swa_checkpoint, swa_from_args
from .tta import with_tta

# Not in the reference: image_size (per epoch), the training resolution, which progressive training changes, and
# bad_files (per epoch), the unreadable images met (replaced in training, left out of validation).
# The report's metrics in the reference's registration order, with its verbosity levels; image_size, bad_files,
# compute_latency_at90 and first_batch_latency are this suite's.
TRAIN_METRICS = {"loss": DEFAULT, "compute_ips": DEFAULT, "total_ips": DEFAULT, "data_time": VERBOSE,
                 "compute_time": VERBOSE, "lr": DEFAULT, "grad_scale": DEFAULT, "image_size": VERBOSE,
                 "bad_files": VERBOSE}
VAL_METRICS = {"top1": DEFAULT, "top5": DEFAULT, "loss": DEFAULT, "compute_ips": DEFAULT, "total_ips": DEFAULT,
               "data_time": VERBOSE, "compute_latency": DEFAULT, "compute_latency_at100": VERBOSE,
               "compute_latency_at99": VERBOSE, "compute_latency_at95": VERBOSE, "compute_latency_at90": VERBOSE,
               "first_batch_latency": VERBOSE, "bad_files": VERBOSE}
# How a metric is summarised over epochs in the run summary (step []), as DLLogger's aggregators.
SUMMARY_BEST = {"top1": max, "top5": max, "loss": min}
SIGNAL_CHECK_EVERY = 20  # distributed runs agree on a stop request every N iterations (the reference's bound)

PrepareModel = Callable[[argparse.Namespace, nn.Module, object, ExecutionContext, Logger], object]


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and returns. A second SIGINT aborts."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, ctx: ExecutionContext) -> bool:
        """Whether any process was asked to stop (a collective in distributed runs)."""
        if not ctx.distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=ctx.device)
        return bool(all_reduce_sum(flag).item() > 0)


@dataclass
class RunState:
    """What the loop carries from epoch to epoch and what a checkpoint restores."""

    epoch: int = 0                   # next epoch to run
    iteration: int = 0               # next batch of `epoch` (non-zero only after a mid-epoch stop)
    best_prec1: float = 0.0
    validated: bool = False          # whether best_prec1 comes from a validation (the first one is always best)
    optimizer_steps: int = 0
    epochs_without_improvement: int = 0
    data_seed: int = 0
    history: list = field(default_factory=list)   # epoch records, for the run summary (kept across --resume)
    # The epoch's loss sums so far, set by a mid-epoch stop and restored by --resume so that the epoch's train.loss
    # is the uninterrupted run's.
    epoch_meter: dict | None = None


@dataclass
class Engine:
    """The model and what trains it."""

    ctx: ExecutionContext
    model: nn.Module                 # unwrapped (what checkpoints hold)
    train_model: nn.Module           # scripted/compiled/DDP-wrapped view used in the loop
    criterion: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    ema: EMA | None = None
    swa: SWA | None = None
    mixup: Mixup | None = None
    accumulation: int = 1
    guard: DivergenceGuard | None = None
    distiller: distillation.Distiller | None = None   # --teacher-arch
    frozen: finetune.FrozenParts | None = None        # --freeze-until


# --- setup ----------------------------------------------------------------------------------------------------

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


def eval_image_size(args, entry) -> int:
    """--eval-image-size, else --image-size, else the arch's evaluation size (EfficientNetV2 evaluates larger)."""
    size = args.eval_image_size or args.image_size or entry.default_eval_image_size
    if size < 1:
        raise UserError(f"--eval-image-size must be positive, got {size}")
    return size


def _loader_options(args, ctx: ExecutionContext, seed: int) -> dict:
    # Normalised as the arch's weights expect (ImageNet statistics, or EfficientNet-Lite's [-1, 1]).
    return dict(batch_size=args.batch_size, ctx=ctx, num_classes=args.model_args.num_classes, workers=args.workers,
                prefetch=args.prefetch, interpolation=args.interpolation, seed=seed, data_format=args.data_format,
                **get_entry(args.arch).preprocessing.normalization)


def build_stage_train_loader(args, ctx: ExecutionContext, settings: StageSettings, seed: int):
    """The training loader of one stage: its image size and RandAugment magnitude, the run's data order."""
    from .data import build_train_loader
    return build_train_loader(args.data_backend, args.data, image_size=settings.image_size,
                              augmentation=args.augmentation, randaug_magnitude=settings.randaug_magnitude,
                              **_loader_options(args, ctx, seed))


def build_loaders(args, ctx: ExecutionContext, settings: StageSettings, eval_size: int, seed: int):
    """(train loader of `settings` or None with --evaluate, val loader or None with --training-only)."""
    from .data import build_val_loader
    train = None if args.evaluate else build_stage_train_loader(args, ctx, settings, seed)
    val = None if args.training_only and not args.evaluate else build_val_loader(
        args.data_backend, args.data, image_size=eval_size, crop_pct=args.eval_crop_pct,
        **_loader_options(args, ctx, seed))
    return train, val


def _loader_key(args, settings: StageSettings) -> tuple:
    # What the train loader is built from: the magnitude only matters to RandAugment.
    return settings.image_size, settings.randaug_magnitude if args.augmentation == "randaugment" else None


def batch_mixer(settings: StageSettings, schedule: ProgressiveSchedule, num_classes: int) -> Mixup | None:
    """The stage's mixup/CutMix, or None when no stage of the run mixes (integer targets throughout)."""
    if not schedule.mixes():
        return None
    return Mixup(settings.mixup, num_classes, cutmix=settings.cutmix)


def enter_stage(settings: StageSettings, built_for: StageSettings, train_loader, engine: Engine, args,
                schedule: ProgressiveSchedule, seed: int, logger: Logger):
    """Train with `settings` from now on; returns the train loader, rebuilt unless `built_for` has its size and
    RandAugment magnitude. Sets the stage's mixup/CutMix strengths on the engine."""
    if _loader_key(args, settings) != _loader_key(args, built_for):
        train_loader.close()
        train_loader = build_stage_train_loader(args, engine.ctx, settings, seed)
    engine.mixup = batch_mixer(settings, schedule, args.model_args.num_classes)
    if schedule.n_stages > 1:
        magnitude = f", randaug magnitude {settings.randaug_magnitude}" if args.augmentation == "randaugment" else ""
        logger.print(f"=> stage {settings.stage + 1}/{schedule.n_stages}: train image size {settings.image_size}, "
                     f"mixup {settings.mixup:g}, cutmix {settings.cutmix:g}{magnitude}")
    return train_loader


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
    afterwards. inductor reads its `freezing` setting when
    it compiles, on the first call and again for each new input shape, and torch.compile's options= does not
    reach that point (torch 2.14 compiles such a model unfrozen), so every call runs under the setting.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.compiled = torch.compile(model)

    def forward(self, *args, **kwargs):
        import torch._inductor.config as inductor_config
        with inductor_config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


def wrap_distributed(model: nn.Module, ctx: ExecutionContext) -> nn.Module:
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def log_parameters(logger: Logger, args, ctx: ExecutionContext) -> None:
    """The reference's start of a report: the flags with the process placement it adds to them, the model's flags
    as model.*, then the metrics (val_ema.* only with --use-ema)."""
    params = ckpt.plain_args(args)
    model_params = params.pop("model_args", {})
    params.update(distributed=ctx.distributed, local_rank=ctx.local_rank,
                  gpu=ctx.device.index if ctx.is_cuda else None, world_size=ctx.world_size)
    logger.log("PARAMETER", params, verbose=False)
    logger.log("PARAMETER", {f"model.{k}": v for k, v in model_params.items()}, verbose=False)
    # train.kd_loss, with a teacher only, follows train.loss.
    train_metrics = {"loss": DEFAULT, "kd_loss": DEFAULT, **TRAIN_METRICS} if args.teacher_arch else TRAIN_METRICS
    prefixes = (("train", train_metrics), ("val", VAL_METRICS))
    if args.use_ema is not None:
        prefixes += (("val_ema", VAL_METRICS),)
    if args.swa_start is not None:
        prefixes += (("swa", VAL_METRICS),)
    for prefix, names in prefixes:
        logger.register_metrics(prefix, names)


AUTO_RESUME = "auto"  # --resume auto: the workspace's latest checkpoint, or a fresh start when there is none


def resume_path(args, ctx: ExecutionContext, checkpoint_prefix: str = "") -> str | None:
    """The checkpoint --resume names, or None for a fresh start; `auto` is the workspace's latest checkpoint
    (<workspace>/<checkpoint_prefix><--checkpoint-filename>) when it exists, so that a requeued job or a worker
    group restarted by torchrun continues where the last one saved. Every process must see the same file."""
    if args.resume != AUTO_RESUME:
        return args.resume or None
    latest = Path(args.workspace) / (checkpoint_prefix + args.checkpoint_filename)
    found = latest.is_file()
    seen_by = int(all_reduce_sum(torch.tensor([int(found)], device=ctx.device)).item())
    if seen_by not in (0, ctx.world_size):
        # Some ranks would resume and others start fresh: refuse rather than train a mixture.
        raise ckpt.CheckpointError(f"--resume auto: {latest} exists for {seen_by} of {ctx.world_size} processes; "
                                   "put --workspace on storage that every node shares")
    return str(latest) if found else None


def read_resume_checkpoint(path: str, args) -> dict:
    """The --resume checkpoint, refused when it is another arch's or has already run --epochs epochs."""
    saved = ckpt.load_checkpoint(path)
    arch = saved.get("arch")
    if arch is not None and arch != args.arch:
        raise ckpt.CheckpointError(f"--resume {path}: the checkpoint is {arch}, --arch is {args.arch}; resume with "
                                   f"--arch {arch}")
    if saved["epoch"] >= args.epochs and not args.evaluate:
        raise ckpt.CheckpointError(f"--resume {path}: the checkpoint has already run {saved['epoch']} epochs, "
                                   f"--epochs is {args.epochs}; nothing left to train (raise --epochs)")
    return saved


def _this_rank(saved: dict, key: str, ctx: ExecutionContext):
    """This process's value of a per-rank checkpoint entry (a list in rank order for distributed runs), or None
    when the checkpoint lacks it or was written by another number of processes."""
    value = saved.get(key)
    if value is None or saved.get("world_size", 1) != ctx.world_size:
        return None
    return value[ctx.rank] if isinstance(value, list) else value


def resume_from(saved: dict, path: str, engine: Engine, state: RunState, train_loader, logger: Logger) -> None:
    """Restore model, optimizer, scaler, EMA, RNG, data position and run state from a training checkpoint."""
    if engine.optimizer is not None:  # training goes on: with the checkpoint's teacher and optimizer groups
        distillation.check_resume(saved, path, engine.distiller)
        if saved.get("optimizer"):
            finetune.check_resume(saved["optimizer"], engine.optimizer, path)
    engine.model.load_state_dict(fit_state_dict(engine.model, saved["state_dict"], source=str(path), resuming=True))
    if engine.optimizer is not None and saved.get("optimizer"):
        engine.optimizer.load_state_dict(saved["optimizer"])
    if engine.scaler is not None and saved.get("scaler"):
        engine.scaler.load_state_dict(saved["scaler"])
    if engine.ema is not None:
        source = saved.get("state_dict_ema") or saved["state_dict"]
        engine.ema.load_state_dict(fit_state_dict(engine.ema.module, source, source=f"{path} (EMA)", resuming=True))
    if engine.swa is not None:
        engine.swa.resume(saved.get("swa"), int(saved["epoch"]), path)
    state.epoch = int(saved["epoch"])
    state.iteration = int(saved.get("iteration", 0))
    state.best_prec1 = float(saved["best_prec1"])
    state.validated = bool(saved.get("validated", state.epoch > 0))
    state.optimizer_steps = int(saved.get("optimizer_steps", 0))
    state.epochs_without_improvement = int(saved.get("epochs_without_improvement", 0))
    state.data_seed = int(saved.get("data_seed", state.data_seed))
    state.history = list(saved.get("history", []))
    engine.guard.resumed(state.history)
    rng = _this_rank(saved, "rng", engine.ctx)
    if rng is not None:
        ckpt.restore_rng_state(rng, engine.ctx)
    if state.iteration:
        state.epoch_meter = _this_rank(saved, "epoch_meter", engine.ctx)
        loader_state = _this_rank(saved, "loader", engine.ctx)
        if train_loader is not None and loader_state is not None:
            train_loader.load_state_dict(loader_state)
    logger.print(f"=> resumed from {path}: epoch {state.epoch}"
                 + (f", iteration {state.iteration}" if state.iteration else "")
                 + f", best top-1 {state.best_prec1:.2f}")


def checkpoint_state(engine: Engine, state: RunState, args, classes: list[str]) -> dict:
    """The checkpoint dict (reference keys first), without the per-rank entries save_checkpoint gathers;
    `classes`: the class names in index order (classify.py prints them, --resume compares them)."""
    out = {
        "epoch": state.epoch,
        "best_prec1": state.best_prec1,
        "state_dict": engine.model.state_dict(),
        "optimizer": engine.optimizer.state_dict() if engine.optimizer is not None else {},
    }
    if engine.ema is not None:
        out["state_dict_ema"] = engine.ema.state_dict()
    if engine.swa is not None:
        out["swa"] = engine.swa.state_dict()
    if engine.distiller is not None:  # which teacher, not its weights: --resume checks it is the same
        out["teacher"] = engine.distiller.identity
    out.update({
        "scaler": engine.scaler.state_dict() if engine.scaler is not None else {},
        "iteration": state.iteration,
        "validated": state.validated,
        "optimizer_steps": state.optimizer_steps,
        "epochs_without_improvement": state.epochs_without_improvement,
        "data_seed": state.data_seed,
        "history": state.history,
        "world_size": engine.ctx.world_size,
        "arch": args.arch,
        "classes": list(classes),
        "args": ckpt.plain_args(args),
    })
    return out


def gather_rank_states(ctx: ExecutionContext, **values) -> dict:
    """`values` of this rank, or of every rank (each a list in rank order) in distributed runs: a collective."""
    if not ctx.distributed:
        return values
    import torch.distributed as dist
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, values)
    return {key: [rank_values[key] for rank_values in everyone] for key in values}


# --- the loops ------------------------------------------------------------------------------------------------

def _batch_size(images) -> int:
    return images.shape[0]


def train_one_epoch(engine: Engine, loader, epoch: int, state: RunState, logger: Logger, args,
                    stop: StopRequest, lr: float) -> dict[str, float]:
    """One epoch (from `state.iteration` on); returns its averaged train.* metrics."""
    ctx = engine.ctx
    model, optimizer, scaler = engine.train_model, engine.optimizer, engine.scaler
    model.train()
    if engine.frozen is not None:
        engine.frozen.keep_eval(model)
    engine.criterion.train()
    start_iteration = state.iteration
    loader.set_epoch(epoch, skip_batches=start_iteration)
    length = len(loader)
    if args.prof > 0:
        length = min(length, args.prof)
    optimizer.zero_grad(set_to_none=True)  # an accumulation never spans two epochs
    losses = _loss_names(engine)
    epoch_meter = SumMeter(losses, ctx.device)
    if start_iteration and state.epoch_meter is not None:  # resumed mid-epoch: the epoch's loss sums so far
        epoch_meter.load_state_dict(state.epoch_meter)
    state.epoch_meter = None
    interval_meter = SumMeter(losses, ctx.device)
    progress = Progress(f"train {epoch}", length, enabled=ctx.is_main_process)
    epoch_images = interval_images = 0
    epoch_data_time = interval_data_time = 0.0
    epoch_start = interval_start = time.perf_counter()
    interval_iterations = iterations = 0
    stopped = False
    data_start = time.perf_counter()
    batches = itertools.islice(loader, max(length - start_iteration, 0))
    iteration = start_iteration - 1
    for iteration, (images, target) in enumerate(batches, start=start_iteration):
        data_time = time.perf_counter() - data_start
        batch = _batch_size(images)
        optimizer_step = (iteration + 1) % engine.accumulation == 0
        loss = train_step(engine, images, target, optimizer_step)
        if optimizer_step:
            state.optimizer_steps += 1
            engine.guard.after_step(epoch, iteration + 1)
        if engine.ema is not None:  # every iteration, counted over the run, as the reference
            engine.ema.update(engine.model, epoch * len(loader) + iteration)
        weighted = _step_losses(engine, loss) * batch
        epoch_meter.add(weighted, batch)
        interval_meter.add(weighted, batch)
        epoch_images += batch
        interval_images += batch
        epoch_data_time += data_time
        interval_data_time += data_time
        interval_iterations += 1
        iterations += 1
        progress.update(iteration - start_iteration, batch)

        if (iteration + 1) % args.print_freq == 0:  # the reference's records; the epoch's end checks its own loss
            ctx.synchronize()
            elapsed = time.perf_counter() - interval_start
            interval_losses = interval_meter.averages(ctx.distributed)
            interval_loss = interval_losses["loss"]
            logger.log((epoch, iteration + 1), {
                **{f"train.{name}": value for name, value in interval_losses.items()},
                **_throughput("train", interval_images * ctx.world_size, interval_iterations, elapsed,
                              interval_data_time),
                "train.lr": lr,
                "train.grad_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
            })
            engine.guard.check_loss(interval_loss, epoch, iteration + 1)
            interval_meter.reset()
            interval_images, interval_iterations, interval_data_time = 0, 0, 0.0
            interval_start = time.perf_counter()

        if optimizer_step and iteration + 1 < length and _should_check_stop(ctx, state.optimizer_steps, engine):
            if stop.agreed(ctx):
                stopped = True
                break
        data_start = time.perf_counter()
    progress.close()
    state.iteration = iteration + 1 if stopped else 0
    ctx.synchronize()
    elapsed = time.perf_counter() - epoch_start
    epoch_losses = epoch_meter.averages(ctx.distributed)
    epoch_loss = epoch_losses["loss"]
    if iterations:
        engine.guard.check_loss(epoch_loss, epoch, iteration + 1)
        engine.guard.check_weights(engine.model, epoch, iteration + 1)
    if stopped:
        state.epoch_meter = epoch_meter.state_dict()
    return {
        **{f"train.{name}": value for name, value in epoch_losses.items()},
        **_throughput("train", epoch_images * ctx.world_size, iterations, elapsed, epoch_data_time),
        "train.lr": lr,
        "train.grad_scale": scaler.get_scale() if scaler.is_enabled() else 1.0,
        "train.bad_files": _count(loader.epoch_bad_files, ctx),
    }


def _loss_names(engine: Engine) -> list[str]:
    """The train.* losses the loop averages: the loss, and with a teacher its distillation term."""
    return ["loss", "kd_loss"] if engine.distiller is not None else ["loss"]


def _step_losses(engine: Engine, loss: torch.Tensor) -> torch.Tensor:
    """The step's values of `_loss_names`, as one tensor."""
    if engine.distiller is None:
        return loss.detach().view(1)
    return torch.stack([loss.detach(), engine.distiller.last_kd_loss])


def _count(value: int, ctx: ExecutionContext) -> int:
    """`value` summed over all processes."""
    if not ctx.distributed:
        return int(value)
    return int(all_reduce_sum(torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)).item())


def _should_check_stop(ctx: ExecutionContext, optimizer_steps: int, engine: Engine) -> bool:
    if not ctx.distributed:
        return True
    return optimizer_steps % max(1, SIGNAL_CHECK_EVERY // engine.accumulation) == 0


def _throughput(prefix: str, images: int, iterations: int, elapsed: float, data_time: float) -> dict[str, float]:
    compute = max(elapsed - data_time, 1e-12)
    return {
        f"{prefix}.total_ips": images / elapsed if elapsed > 0 else 0.0,
        f"{prefix}.compute_ips": images / compute,
        f"{prefix}.data_time": data_time / max(iterations, 1),
        f"{prefix}.compute_time": compute / max(iterations, 1),
    }


def train_step(engine: Engine, images: torch.Tensor, target: torch.Tensor, optimizer_step: bool) -> torch.Tensor:
    """Forward and backward of one batch; the optimizer steps when `optimizer_step` (end of an accumulation)."""
    if engine.mixup is not None:
        images, target = engine.mixup(images, target)
    # DDP skips the gradient all-reduce on iterations that only accumulate.
    sync = contextlib.nullcontext() if optimizer_step or not hasattr(engine.train_model, "no_sync") \
        else engine.train_model.no_sync()
    with sync:
        with engine.ctx.autocast():
            if engine.distiller is None:
                # One expression, so the logits are freed before backward (only the loss's own saved tensors stay).
                loss = engine.criterion(engine.train_model(images), target)
            else:  # the teacher sees the same (mixed) batch
                logits = engine.train_model(images)
                loss = engine.distiller.loss(engine.criterion(logits, target), logits, images)
                del logits
        engine.scaler.scale(loss / engine.accumulation).backward()
    if optimizer_step:
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
        engine.optimizer.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def validate(model: nn.Module, loader, ctx: ExecutionContext, logger: Logger, args, *, prefix: str = "val",
             step: tuple[int, ...] = (0, 0)) -> dict[str, float]:
    """Loss, top-1 and top-k (all-reduced), throughput and per-batch compute latency (mean and percentiles), of
    `model` as --tta evaluates it."""
    model = with_tta(model, args.tta)
    model.eval()
    loader.set_epoch(step[0])
    length = len(loader) if args.prof <= 0 else min(len(loader), args.prof)
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
        loss = F.cross_entropy(output.float(), target, reduction="sum")
        correct = topk_correct(output, target, (1, args.topk))
        sums = torch.cat([loss.view(1).double(), correct.double()])
        meter.add(sums, images.shape[0])
        interval_meter.add(sums, images.shape[0])
        ctx.synchronize()  # latency is the thing measured here
        latencies.append(time.perf_counter() - compute_start)
        batch_sizes.append(images.shape[0])
        images_seen += images.shape[0]
        progress.update(i, images.shape[0])
        if (i + 1) % args.print_freq == 0:
            # This process's batches since the last record (the reference's per-iteration meters); the epoch
            # record below is over every process.
            done = len(latencies) - args.print_freq
            images = sum(batch_sizes[done:])
            logger.log((*step, i + 1), _validation_metrics(
                prefix, interval_meter.averages(distributed=False), latencies[done:], images, total_images=images,
                data_time=sum(data_times[done:]) / args.print_freq, elapsed=time.perf_counter() - interval_start,
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
        **_validation_metrics(prefix, averages, steady, steady_images * ctx.world_size,
                              total_images=images_seen * ctx.world_size,
                              data_time=sum(data_times) / max(len(latencies), 1), elapsed=elapsed,
                              quantiles=(100, 99, 95, 90)),
        f"{prefix}.first_batch_latency": first,
        f"{prefix}.bad_files": _count(loader.epoch_bad_files, ctx),
    }


def _validation_metrics(prefix: str, averages: dict[str, float], latencies: list[float], images: int, *,
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


# --- the job --------------------------------------------------------------------------------------------------

def _summary(history: list[dict]) -> dict[str, float]:
    """Run summary over the epoch records: best top-1/top-5, lowest loss, mean throughput/times, last LR."""
    summary: dict[str, float] = {}
    for key in dict.fromkeys(k for record in history for k in record):
        values = [r[key] for r in history if key in r and isinstance(r[key], (int, float))
                  and not (isinstance(r[key], float) and math.isnan(r[key]))]
        if not values:
            continue
        name = key.split(".")[-1]
        if name in SUMMARY_BEST:
            summary[key] = SUMMARY_BEST[name](values)
        elif name in ("lr", "grad_scale", "image_size"):
            summary[key] = values[-1]
        elif name == "bad_files":  # unreadable images met over the run (a bad file counts once per epoch)
            summary[key] = int(sum(values))
        else:
            summary[key] = sum(values) / len(values)
    return summary


def main(args: argparse.Namespace, *, prepare_model: PrepareModel | None = None, checkpoint_prefix: str = ""
         ) -> dict:
    """Run the job main.py describes (train + validate, or --evaluate) and return the summary metrics.

    The summary's "interrupted" is True when SIGTERM/SIGINT stopped the run (its checkpoint written).
    """
    ctx = create_context(device=None if args.device == "auto" else args.device, amp=args.amp,
                         memory_format=args.memory_format, allow_tf32=args.tf32, dist_backend=args.dist_backend)
    if not ctx.is_cuda and not set_cpu_allocator(args.cpu_allocator):
        warnings.warn(f"--cpu-allocator {args.cpu_allocator} needs glibc; this C library keeps its own defaults",
                      stacklevel=2)
    fused.set_enabled(args.cpu_kernels == "auto")
    try:
        set_affinity(args.gpu_affinity, ctx)
        if args.seed is not None:
            seed_everything(args.seed + ctx.local_rank)
        job = setup_run(args, ctx, prepare_model, checkpoint_prefix)
        with job.logger, job, StopRequest() as stop:
            job.logger.begin()
            if ctx.is_main_process and job.args.save_checkpoints and not args.evaluate:
                job.writer = ckpt.CheckpointWriter(args.workspace, filename=checkpoint_prefix + args.checkpoint_filename,
                                                   keep_last=args.gather_checkpoints)
                ckpt.write_class_names(args.workspace, job.classes)
            result = evaluate(job) if args.evaluate else train(job, stop)
            # Every rank past its last collective (and rank 0 past its checkpoint) before any tears the group down.
            ctx.barrier()
            return result
    finally:
        if ctx.distributed:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


@dataclass
class Job:
    """A run set up by setup_run, ready to train or evaluate."""

    args: argparse.Namespace
    engine: Engine
    state: RunState
    schedule: ProgressiveSchedule
    stage: StageSettings             # the stage train_loader was built for
    train_loader: object | None      # None with --evaluate
    val_loader: object | None        # None with --training-only
    logger: Logger
    writer: ckpt.CheckpointWriter | None = None   # rank 0 of a run that saves checkpoints

    @property
    def classes(self) -> list[str]:
        """The data's class names in index order."""
        loader = self.train_loader if self.train_loader is not None else self.val_loader
        return list(loader.classes)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        """Stop the loaders' worker processes and pipelines now, whether the run ended well or not."""
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()


def setup_run(args, ctx: ExecutionContext, prepare_model: PrepareModel | None, checkpoint_prefix: str = "") -> Job:
    """Build the model, loaders, optimizer and report and restore --resume; every check that can refuse the run
    happens here, before a file is written (the report is kept in memory until the job's logger begins).
    The job's args carry --resume as the file it resumed from (None for a fresh start), `auto` resolved."""
    resume = resume_path(args, ctx, checkpoint_prefix)
    fresh_auto_start = args.resume == AUTO_RESUME and resume is None
    if resume != args.resume:
        args = argparse.Namespace(**{**vars(args), "resume": resume})
    finetune.check_flags(args)
    distillation.check_flags(args)
    saved = read_resume_checkpoint(args.resume, args) if args.resume else None
    accumulation = accumulation_steps(args.optimizer_batch_size, args.batch_size, ctx.world_size)
    entry = get_entry(args.arch)
    # --evaluate trains no stage: its --epochs (often 1) need not hold --n-stages.
    staged = args if not args.evaluate else argparse.Namespace(**{**vars(args), "n_stages": 1,
                                                                  "epochs": max(args.epochs, 1)})
    schedule = progressive_schedule(staged, entry.default_image_size)
    eval_size = eval_image_size(args, entry)
    logger = Logger(Path(args.workspace) / args.raport_file, enabled=ctx.is_main_process, append=bool(args.resume),
                    deferred=True)
    log_parameters(logger, args, ctx)
    if fresh_auto_start:
        logger.print(f"=> --resume auto: no checkpoint at "
                     f"{Path(args.workspace) / (checkpoint_prefix + args.checkpoint_filename)}; starting fresh")
    model = entry(**vars(args.model_args))
    frozen = finetune.prepare(model, args)
    state = RunState(data_seed=shared_seed(ctx, args.seed))
    if saved is not None:
        # The data order of a resumed run comes from the checkpoint: its seed is needed by the loaders, and its
        # epoch decides the stage the train loader starts in.
        state.data_seed = int(saved.get("data_seed", state.data_seed))
    stage = schedule.settings(min(int(saved["epoch"]) if saved is not None else 0, schedule.epochs - 1))
    train_loader, val_loader = build_loaders(args, ctx, stage, eval_size, state.data_seed)
    if saved is not None:
        ckpt.check_classes(saved, args.resume, (train_loader if train_loader is not None else val_loader).classes)
    model = model.to(ctx.device, memory_format=ctx.memory_format)
    if prepare_model is not None:
        prepare_model(args, model, train_loader, ctx, logger)
    train_model = compile_model(model, args.jit, frozen=args.evaluate)
    if not args.evaluate:  # evaluation all-reduces its metrics and needs no gradient synchronisation
        train_model = wrap_distributed(train_model, ctx)
    scaler = ctx.grad_scaler(args.static_loss_scale)
    engine = Engine(ctx=ctx, model=model, train_model=train_model,
                    criterion=build_loss(args.label_smoothing, schedule.max_mixup, schedule.max_cutmix).to(ctx.device),
                    scaler=scaler, accumulation=accumulation, guard=DivergenceGuard(scaler, causes_for(args)),
                    frozen=frozen)
    if not args.evaluate:
        engine.optimizer = optimizer_from_args(model, args)
        engine.distiller = distillation.distiller_from_args(args, ctx)
    if args.use_ema is not None:
        engine.ema = EMA(model, args.use_ema)
    engine.swa = swa_from_args(args, model, engine.optimizer)
    if saved is not None:
        resume_from(saved, args.resume, engine, state, train_loader, logger)
    return Job(args=args, engine=engine, state=state, schedule=schedule, stage=stage, train_loader=train_loader,
               val_loader=val_loader, logger=logger)


def evaluate(job: Job) -> dict:
    """--evaluate: validate the model (and its EMA) once; the summary of that one record."""
    args, engine, state = job.args, job.engine, job.state
    step = (state.epoch, 0)
    record = validate(engine.train_model, job.val_loader, engine.ctx, job.logger, args, step=step)
    if engine.ema is not None:
        record.update(validate(engine.ema.module, job.val_loader, engine.ctx, job.logger, args, prefix="val_ema",
                               step=step))
    job.logger.log((state.epoch,), record)
    summary = _summary([record])
    job.logger.log((), summary)
    return summary


def save_checkpoint(job: Job, *, is_best: bool) -> None:
    """Write the workspace's checkpoints (rank 0) with every rank's RNG state and, mid-epoch, its data position and
    epoch sums: a collective, so every rank calls it."""
    if not job.args.save_checkpoints:
        return
    ctx, state = job.engine.ctx, job.state
    per_rank = {"rng": ckpt.capture_rng_state(ctx)}
    if state.iteration:
        per_rank.update(loader=job.train_loader.state_dict(), epoch_meter=state.epoch_meter)
    per_rank = gather_rank_states(ctx, **per_rank)
    if job.writer is not None:
        job.writer.save({**checkpoint_state(job.engine, state, job.args, job.classes), **per_rank}, is_best=is_best)


def finish_swa(job: Job) -> dict[str, float]:
    """The end of an SWA run: BN statistics of the averaged weights, their validation (swa.*), the latest
    checkpoint again with those statistics, and model_swa.pth.tar."""
    args, engine, state = job.args, job.engine, job.state
    if engine.swa.n_averaged == 0:  # early stopping before --swa-start
        job.logger.print(f"=> SWA: the run stopped before --swa-start {args.swa_start}; nothing was averaged")
        return {}
    engine.swa.update_bn(job.train_loader, engine.ctx, epoch=state.epoch, max_batches=args.prof if args.prof > 0
                         else None)
    record = {}
    if job.val_loader is not None:
        record = validate(engine.swa.module, job.val_loader, engine.ctx, job.logger, args, prefix="swa",
                          step=(state.epoch, 0))
    save_checkpoint(job, is_best=False)
    if job.writer is not None:
        path = job.writer.workspace / SWA_FILE
        ckpt.atomic_save(swa_checkpoint(checkpoint_state(engine, state, args, job.classes), engine.swa), path)
        job.logger.print(f"=> SWA: {engine.swa.n_averaged} epochs averaged, BN statistics updated; saved {path}")
    return record


def train(job: Job, stop: StopRequest) -> dict:
    """Epochs from the run state's to --epochs (or --run-epochs of them); stops early on patience or a signal."""
    args, engine, state, logger = job.args, job.engine, job.state, job.logger
    lr_of = schedule_from_args(args)
    last_epoch = args.epochs if args.run_epochs < 0 else min(args.epochs, state.epoch + args.run_epochs)
    train_loader = job.train_loader
    current = None  # the stage being trained; job.stage is the one train_loader was built for
    interrupted = stopped_early = False
    while state.epoch < last_epoch:
        epoch = state.epoch
        settings = job.schedule.settings(epoch)
        if settings != current:
            train_loader = enter_stage(settings, job.stage, train_loader, engine, args, job.schedule,
                                       state.data_seed, logger)
            job.train_loader, current, job.stage = train_loader, settings, settings
        lr = lr_of(epoch) if engine.swa is None else engine.swa.lr(epoch, lr_of(epoch))
        set_lr(engine.optimizer, lr)
        record = train_one_epoch(engine, train_loader, epoch, state, logger, args, stop, lr)
        record["train.image_size"] = settings.image_size
        if state.iteration:
            # Stopped mid-epoch by a signal: save where we are and leave. The epoch's record is logged once, by
            # the run that finishes it.
            interrupted = True
            save_checkpoint(job, is_best=False)
            logger.print(f"=> stopped by signal at epoch {epoch} iteration {state.iteration}; "
                         + (f"saved {job.writer.latest}; continue with --resume {job.writer.latest}"
                            if job.writer is not None else "no checkpoint (--no-checkpoints)"))
            break
        if engine.swa is not None:
            engine.swa.end_of_epoch(engine.model, epoch)
        is_best = False
        if job.val_loader is not None:
            # The reference's validation steps carry the epoch's training iteration count (--prof shortens it).
            step = (epoch, len(train_loader) if args.prof <= 0 else min(len(train_loader), args.prof))
            record.update(validate(engine.train_model, job.val_loader, engine.ctx, logger, args, step=step))
            if engine.ema is not None:
                record.update(validate(engine.ema.module, job.val_loader, engine.ctx, logger, args, prefix="val_ema",
                                       step=step))
            is_best = record["val.top1"] > state.best_prec1 or not state.validated
            if is_best:
                state.best_prec1 = record["val.top1"]
                state.validated = True
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
        logger.log((epoch,), record)
        state.history.append(record)
        state.epoch = epoch + 1
        save_checkpoint(job, is_best=is_best)
        logger.flush()
        if (args.early_stopping_patience > 0 and job.val_loader is not None
                and state.epochs_without_improvement >= args.early_stopping_patience):
            logger.print(f"=> early stopping: no better val top-1 for {state.epochs_without_improvement} epochs")
            stopped_early = True
            break
        if stop.agreed(engine.ctx):
            interrupted = True
            logger.print(f"=> stopped by signal after epoch {epoch}"
                         + (f"; continue with --resume {job.writer.latest}" if job.writer is not None else ""))
            break
    summary = _summary(state.history)
    if engine.swa is not None and not interrupted and (stopped_early or state.epoch >= args.epochs):
        summary.update(finish_swa(job))
    if not interrupted:  # an interrupted run is summarised by the run that finishes it
        logger.log((), summary)
    return {**summary, "best_prec1": state.best_prec1, "epoch": state.epoch, "interrupted": interrupted}
