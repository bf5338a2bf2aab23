"""The job: a run's config, trainer, state, loaders, report and features, and what the loop and the features do
with them (validate a model, write the checkpoints)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .. import checkpoint as ckpt
from ..config import Config
from ..context import ExecutionContext
from ..features import TrainingFeature
from ..logger import Logger
from .confusion import ConfusionMatrix
from .state import RunState, Trainer
from .validate import EvalOptions, validate


@dataclass
class Job:
    """A run set up by setup.setup_job, ready to train or evaluate."""

    config: Config
    trainer: Trainer
    state: RunState
    train_loader: object | None      # None with --evaluate
    val_loader: object | None        # None with --training-only
    logger: Logger
    features: list[TrainingFeature] = field(default_factory=list)
    writer: ckpt.CheckpointWriter | None = None   # rank 0 of a run that saves checkpoints

    @property
    def ctx(self) -> ExecutionContext:
        return self.trainer.ctx

    @property
    def classes(self) -> list[str]:
        """The data's class names in index order."""
        loader = self.train_loader if self.train_loader is not None else self.val_loader
        return list(loader.classes)

    def validate(self, model: nn.Module, *, prefix: str = "val", step: tuple[int, ...] = (0, 0),
                 confusion: ConfusionMatrix | None = None) -> dict[str, float]:
        """The validation record of `model` on the job's val loader, as --tta evaluates, with the training loss's
        criterion; `confusion` collects its predictions per class."""
        return validate(model, self.val_loader, self.ctx, self.logger, EvalOptions.from_config(self.config),
                        prefix=prefix, step=step, criterion=self.trainer.loss.criterion, confusion=confusion)

    def validate_all(self, step: tuple[int, ...], confusion: ConfusionMatrix | None = None) -> dict[str, float]:
        """The model's validation record (its predictions per class into `confusion`), then that of every model a
        feature validates (val_ema, ...)."""
        record = self.validate(self.trainer.train_model, step=step, confusion=confusion)
        for feature in self.features:
            for prefix, model in feature.models_to_validate():
                record.update(self.validate(model, prefix=prefix, step=step))
        return record

    def checkpoint(self, **per_rank) -> ckpt.Checkpoint:
        """The run as a checkpoint, with the training features' states; `per_rank` as save_checkpoint gathers it."""
        trainer, state, config = self.trainer, self.state, self.config
        return ckpt.Checkpoint(
            epoch=state.epoch, best_prec1=state.best_prec1, state_dict=trainer.model.state_dict(),
            optimizer=trainer.optimizer.state_dict() if trainer.optimizer is not None else {},
            extras={feature.checkpoint_key: feature.state_dict() for feature in self.features
                    if feature.checkpoint_key is not None},
            scaler=trainer.scaler.state_dict(), iteration=state.iteration, validated=state.validated,
            optimizer_steps=state.optimizer_steps, accumulated_iterations=state.accumulated,
            accumulation=trainer.accumulation, epochs_without_improvement=state.epochs_without_improvement,
            data_seed=state.data_seed, history=state.history, world_size=trainer.ctx.world_size,
            arch=config.model.arch, classes=self.classes, args=config.plain(), per_rank=per_rank)

    def save_checkpoint(self, *, is_best: bool) -> None:
        """Write the workspace's checkpoints (rank 0) with every rank's RNG state and, mid-epoch, its data position
        and epoch sums, and between optimizer steps its gradients: a collective, so every rank calls it."""
        if not self.config.checkpoint.save_checkpoints:
            return
        ctx, state = self.ctx, self.state
        per_rank = {"rng": ckpt.capture_rng_state(ctx)}
        if state.iteration:
            per_rank.update(loader=self.train_loader.state_dict(), epoch_meter=state.epoch_meter)
        if state.accumulated:
            # Between two optimizer steps each process holds the gradients of its own batches (DDP averages them
            # only at the step), so they are saved per process, as the RNG states are.
            per_rank["gradients"] = ckpt.capture_gradients(self.trainer.model)
        per_rank = gather_rank_states(ctx, **per_rank)
        if self.writer is not None:
            self.writer.save(self.checkpoint(**per_rank), is_best=is_best)

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        """Stop the loaders' worker processes and pipelines now, whether the run ended well or not."""
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                loader.close()


def gather_rank_states(ctx: ExecutionContext, **values) -> dict:
    """`values` of this rank, or in distributed runs of every rank on rank 0 (each a list in rank order; {} on the
    other ranks, which write no file): a collective. Gathered to rank 0 alone, as the accumulated gradients they
    may hold are each a copy of the model's size."""
    if not ctx.distributed:
        return values
    import torch.distributed as dist
    everyone: list | None = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(values, everyone, dst=0)
    if everyone is None:
        return {}
    return {key: [rank_values[key] for rank_values in everyone] for key in values}
