"""Stochastic weight averaging (--swa-start, --swa-lr, --swa-anneal-epochs), with torch.optim.swa_utils.

From epoch --swa-start on (0-based) the LR is SWALR's instead of --lr-schedule's: at the start of each such epoch
it moves from the LR in use towards --swa-lr by cosine annealing over --swa-anneal-epochs epochs, then stays
there. At the end of each of those epochs the weights join an equal-weight running average (AveragedModel over
the parameters). When the run completes (its last epoch, or early stopping), the averaged model's BatchNorm
statistics are measured afresh over one pass of the training loader (update_bn; averaged over processes in
distributed runs), it is validated and reported as swa.* in the run summary, and it is written to
<workspace>/model_swa.pth.tar, a checkpoint whose state_dict is the SWA weights (for --evaluate --resume,
--pretrained-from-file, classify.py).

Training checkpoints carry the SWA state under "swa" (averaged weights and buffers, the number of epochs averaged,
SWALR's state), so that --resume continues the average and the LR exactly, also from the middle of an epoch.
"""
from __future__ import annotations

import dataclasses
import itertools
import warnings

import torch
from torch import nn
from torch.optim.swa_utils import SWALR, AveragedModel

from ..atomic import atomic_save
from ..checkpoint import EMA_KEY, Checkpoint, CheckpointError
from ..cli import UserError
from ..config import Config
from ..context import ExecutionContext
from ..features import TrainingFeature
from ..metrics import VAL_METRICS, all_reduce_sum
from .averaging import recompute_bn

SWA_FILE = "model_swa.pth.tar"
ANNEAL_STRATEGY = "cos"


class SWA(TrainingFeature):
    """The training feature of --swa-start: the averaged copy of the model and the LR schedule of the averaging
    epochs."""

    checkpoint_key = "swa"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, start: int, swa_lr: float,
                 anneal_epochs: int):
        self.start = start
        self.swa_lr = swa_lr
        self.optimizer = optimizer
        self.averaged = AveragedModel(model)
        # Built before any optimizer step: its first step leaves the LR as it is (with annealing), and
        # --lr-schedule sets every epoch's LR before --swa-start anyway.
        self.scheduler = SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=anneal_epochs,
                               anneal_strategy=ANNEAL_STRATEGY)

    @property
    def module(self) -> nn.Module:
        """The averaged model (what is validated and saved)."""
        return self.averaged.module

    @property
    def n_averaged(self) -> int:
        """How many epochs' weights are in the average."""
        return int(self.averaged.n_averaged.item())

    @classmethod
    def metrics(cls, config: Config) -> dict[str, dict[str, int]]:
        return {"swa": VAL_METRICS} if config.swa.swa_start is not None else {}

    @classmethod
    def from_config(cls, config: Config, job) -> "SWA | None":
        check_flags(config)
        if config.swa.swa_start is None:
            return None
        return cls(job.trainer.model, job.trainer.optimizer, start=config.swa.swa_start, swa_lr=config.swa.swa_lr,
                   anneal_epochs=config.swa.swa_anneal_epochs)

    def epoch_lr(self, job, epoch: int, lr: float) -> float:
        """The LR of `epoch`: `lr` (--lr-schedule's) before --swa-start, SWALR's from then on."""
        if epoch < self.start:
            return lr
        # One SWALR step per averaging epoch, taken as the epoch starts; a run resumed in the middle of an
        # epoch has already taken that epoch's step (its state is in the checkpoint).
        with warnings.catch_warnings():
            # It would warn when no optimizer step came before (--swa-start 0, or a resumed run): a per-iteration
            # scheduler's concern, not this per-epoch one's.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
            while self.scheduler.last_epoch < epoch - self.start + 1:
                self.scheduler.step()
        return self.scheduler.get_last_lr()[0]

    def end_epoch(self, job, epoch: int, record: dict[str, float]) -> None:
        """Add the weights after `epoch` to the average, from --swa-start on."""
        if epoch >= self.start:
            self.averaged.update_parameters(job.trainer.model)

    def end_run(self, job) -> dict[str, float]:
        """BN statistics of the averaged weights, their validation (swa.*), the latest checkpoint again with those
        statistics, and model_swa.pth.tar."""
        if self.n_averaged == 0:  # early stopping before --swa-start
            job.logger.print(f"=> SWA: the run stopped before --swa-start {self.start}; nothing was averaged")
            return {}
        prof = job.config.runtime.prof
        self.update_bn(job.train_loader, job.ctx, epoch=job.state.epoch, max_batches=prof if prof > 0 else None)
        record = job.validate(self.module, prefix="swa", step=(job.state.epoch, 0)) if job.val_loader is not None \
            else {}
        job.save_checkpoint(is_best=False)
        if job.writer is not None:
            path = job.writer.workspace / SWA_FILE
            atomic_save(swa_checkpoint(job.checkpoint(), self).to_dict(), path)
            job.logger.print(f"=> SWA: {self.n_averaged} epochs averaged, BN statistics updated; saved {path}")
        return record

    def update_bn(self, loader, ctx: ExecutionContext, *, epoch: int, max_batches: int | None = None) -> None:
        """BN statistics of the averaged weights over one pass of the training `loader` (the first `max_batches`
        batches with --prof), averaged over processes."""
        loader.set_epoch(epoch)
        recompute_bn(self.module, itertools.islice(loader, max_batches or len(loader)), ctx)
        if ctx.distributed:
            for module in self.module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    for stats in (module.running_mean, module.running_var):
                        stats.copy_(all_reduce_sum(stats.clone()) / ctx.world_size)

    def state_dict(self) -> dict:
        return {"start": self.start, "state_dict": self.module.state_dict(),
                "n_averaged": self.averaged.n_averaged.clone(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict | None, checkpoint: Checkpoint, source: str) -> None:
        """Restore the SWA state of a checkpoint (refusing one that has passed --swa-start without it)."""
        epoch = int(checkpoint.epoch)
        if state is None:
            if epoch > self.start:
                raise CheckpointError(f"--resume {source}: the checkpoint is at epoch {epoch}, after --swa-start "
                                      f"{self.start}, and has no SWA state (trained without --swa-start)")
        else:
            if int(state["start"]) != self.start and epoch > min(int(state["start"]), self.start):
                raise CheckpointError(f"--resume {source}: the run averages from epoch {state['start']}, "
                                      f"--swa-start is {self.start}; resume with --swa-start {state['start']}")
            self.module.load_state_dict(state["state_dict"])
            self.averaged.n_averaged.copy_(state["n_averaged"])
            self.scheduler.load_state_dict(state["scheduler"])
        # The optimizer state just restored may come from a run without SWA (no swa_lr in its groups) or
        # another --swa-lr: this run's flag decides.
        for group in self.optimizer.param_groups:
            group["swa_lr"] = self.swa_lr


def check_flags(config: Config) -> None:
    """Refuse SWA flags that would average nothing."""
    swa = config.swa
    if swa.swa_start is None:
        if swa.swa_lr is not None:
            raise UserError("--swa-lr needs --swa-start EPOCH (the first epoch averaged)")
        return
    if swa.swa_lr is None:
        raise UserError("--swa-start needs --swa-lr LR (the learning rate of the averaging epochs)")
    if config.runtime.evaluate:
        raise UserError(f"--swa-start is for training; to evaluate a run's SWA weights use --evaluate --resume "
                        f"<workspace>/{SWA_FILE}")
    if swa.swa_start >= config.schedule.epochs:
        raise UserError(f"--swa-start {swa.swa_start} averages nothing in a run of --epochs {config.schedule.epochs} "
                        f"(epochs are counted from 0)")


def swa_checkpoint(checkpoint: Checkpoint, swa: SWA) -> Checkpoint:
    """The model_swa.pth.tar of a run: its checkpoint with the SWA weights as state_dict, no optimizer state (nor
    EMA weights or SWA state), and the number of epochs averaged."""
    extras = {key: value for key, value in checkpoint.extras.items() if key not in (EMA_KEY, SWA.checkpoint_key)}
    return dataclasses.replace(checkpoint, state_dict=swa.module.state_dict(), optimizer={},
                               extras={**extras, "swa_epochs_averaged": swa.n_averaged})
