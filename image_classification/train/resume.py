"""--resume: which checkpoint, whether this run can continue it, and restoring everything it holds."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..config import Config
from ..context import ExecutionContext
from ..features import FEATURES
from ..metrics import all_reduce_sum
from ..models.weights import fit_state_dict
from .job import Job

AUTO_RESUME = "auto"  # --resume auto: the workspace's latest checkpoint, or a fresh start when there is none


def resume_path(config: Config, ctx: ExecutionContext) -> str | None:
    """The checkpoint --resume names, or None for a fresh start; `auto` is the workspace's latest checkpoint
    (<workspace>/<prefix><--checkpoint-filename>) when it exists, so that a requeued job or a worker group restarted
    by torchrun continues where the last one saved. Every process must see the same file."""
    if config.checkpoint.resume != AUTO_RESUME:
        return config.checkpoint.resume or None
    latest = Path(config.checkpoint.workspace) / config.checkpoint.filename
    found = latest.is_file()
    seen_by = int(all_reduce_sum(torch.tensor([int(found)], device=ctx.device)).item())
    if seen_by not in (0, ctx.world_size):
        # Some ranks would resume and others start fresh: refuse rather than train a mixture.
        raise ckpt.CheckpointError(f"--resume auto: {latest} exists for {seen_by} of {ctx.world_size} processes; "
                                   "put --workspace on storage that every node shares")
    return str(latest) if found else None


def read_resume_checkpoint(path: str, config: Config) -> ckpt.Checkpoint:
    """The --resume checkpoint, refused when it is another arch's or has already run --epochs epochs."""
    saved = ckpt.load_checkpoint(path)
    arch, wanted = saved.arch, config.model.arch
    if arch is not None and arch != wanted:
        raise ckpt.CheckpointError(f"--resume {path}: the checkpoint is {arch}, --arch is {wanted}; resume with "
                                   f"--arch {arch}")
    epochs = config.schedule.epochs
    if saved.epoch >= epochs and not config.runtime.evaluate:
        raise ckpt.CheckpointError(f"--resume {path}: the checkpoint has already run {saved.epoch} epochs, "
                                   f"--epochs is {epochs}; nothing left to train (raise --epochs)")
    return saved


def resume_from(saved: ckpt.Checkpoint, path: str, job: Job) -> None:
    """Restore model, optimizer, scaler, run state, accumulated gradients, every feature's state, RNG and data
    position from a training checkpoint."""
    trainer, state, ctx = job.trainer, job.state, job.ctx
    if trainer.optimizer is not None and saved.optimizer:
        check_optimizer_groups(saved.optimizer, trainer.optimizer, path)
    trainer.model.load_state_dict(fit_state_dict(trainer.model, saved.state_dict, source=str(path), resuming=True))
    if trainer.optimizer is not None and saved.optimizer:
        trainer.optimizer.load_state_dict(saved.optimizer)
    if saved.scaler:
        trainer.scaler.load_state_dict(saved.scaler)
    state.epoch = int(saved.epoch)
    state.iteration = int(saved.iteration)
    state.best_prec1 = float(saved.best_prec1)
    state.validated = bool(saved.validated if saved.validated is not None else state.epoch > 0)
    state.optimizer_steps = int(saved.optimizer_steps)
    if trainer.optimizer is not None:
        state.accumulated = resume_accumulation(saved, job)
    state.epochs_without_improvement = int(saved.epochs_without_improvement)
    state.data_seed = int(saved.data_seed if saved.data_seed is not None else state.data_seed)
    state.history = list(saved.history)
    active = {type(feature) for feature in job.features}
    for feature in job.features:
        key = feature.checkpoint_key
        feature.load_state_dict(saved.extras.get(key) if key else None, saved, path)
    if trainer.optimizer is not None:  # training goes on: features the checkpoint used may have to go on too
        for name in FEATURES:
            kind = FEATURES.get(name)
            if kind not in active and kind.checkpoint_key in saved.extras:
                kind.check_absent(saved.extras[kind.checkpoint_key], path)
    rng = saved.this_rank("rng", ctx.rank, ctx.world_size)
    if rng is not None:
        ckpt.restore_rng_state(rng, ctx)
    if state.iteration:
        state.epoch_meter = saved.this_rank("epoch_meter", ctx.rank, ctx.world_size)
        loader_state = saved.this_rank("loader", ctx.rank, ctx.world_size)
        if job.train_loader is not None and loader_state is not None:
            job.train_loader.load_state_dict(loader_state)
    job.logger.print(f"=> resumed from {path}: epoch {state.epoch}"
                     + (f", iteration {state.iteration}" if state.iteration else "")
                     + (f", {state.accumulated} iterations into an accumulated step" if state.accumulated else "")
                     + f", best top-1 {state.best_prec1:.2f}")


def resume_accumulation(saved: ckpt.Checkpoint, job: Job) -> int:
    """Restore the gradients a checkpoint written between two optimizer steps holds; returns how many
    iterations they sum. A run that accumulates differently (another --optimizer-batch-size, batch size or number
    of processes) cannot continue that sum: it starts a fresh accumulation and says so."""
    trainer = job.trainer
    accumulated = int(saved.accumulated_iterations)
    if not accumulated:
        return 0
    gradients = saved.this_rank("gradients", trainer.ctx.rank, trainer.ctx.world_size)
    saved_accumulation = int(saved.accumulation)
    if gradients is None or saved_accumulation != trainer.accumulation:
        job.logger.print(f"=> the checkpoint stopped {accumulated} of {saved_accumulation} iterations into an "
                         f"accumulated step, on {saved.world_size} processes; this run accumulates "
                         f"{trainer.accumulation} on {trainer.ctx.world_size}, so those gradients are dropped")
        return 0
    ckpt.restore_gradients(trainer.model, gradients)
    return accumulated


def optimizer_layout(groups: list[dict]) -> list[tuple[int, float]]:
    """(parameter count, LR factor) per optimizer group: what --resume compares with the checkpoint's."""
    return [(len(group["params"]), float(group.get("lr_scale", 1.0))) for group in groups]


def check_optimizer_groups(saved_optimizer: dict, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Refuse a checkpoint whose optimizer groups were built by other --layer-decay, --head-lr-scale or
    --freeze-until values (a resumed run would otherwise keep the checkpoint's silently, or fail to load)."""
    saved_groups = saved_optimizer.get("param_groups")
    if not saved_groups:
        return
    if optimizer_layout(saved_groups) != optimizer_layout(optimizer.param_groups):
        raise ckpt.CheckpointError(f"--resume {path}: its optimizer groups (parameter count, LR factor) "
                                   f"{optimizer_layout(saved_groups)} differ from this run's "
                                   f"{optimizer_layout(optimizer.param_groups)}; resume with the run's --layer-decay, "
                                   "--head-lr-scale and --freeze-until")
