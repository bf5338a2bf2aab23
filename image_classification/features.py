"""Training features: what plugs into the training loop without a branch in it.

A feature is a TrainingFeature subclass in a module of its own, listed once in FEATURES. For every run the loop
asks each listed class `from_config(config, job)` for an instance (None: off for this run) and then calls the
instances' hooks, in FEATURES' order; a hook a feature does not override does nothing.

    class GradientNoise(TrainingFeature):                 # image_classification/toolkit/gradient_noise.py
        @classmethod
        def from_config(cls, config, job): ...            # None unless its flag is given
        def after_step(self, job, step): ...

    FEATURES.register("gradient-noise", "image_classification.toolkit.gradient_noise:GradientNoise")

What the hooks receive is the train package's Job (model, optimizer, loaders, logger, run state) and, after each
iteration, a Step. A feature whose state must survive --resume names its checkpoint key and implements
state_dict / load_state_dict. ARCHITECTURE.md walks through adding one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from .registry import Registry

if TYPE_CHECKING:  # the train package imports this module, not the other way round
    from .checkpoint import Checkpoint
    from .config import Config
    from .train.job import Job


@dataclass(frozen=True)
class Step:
    """One training iteration, as after_step sees it."""

    epoch: int
    iteration: int                   # within the epoch, from 0
    optimizer_step: bool             # whether the optimizer stepped (the end of an accumulation)
    logged_loss: float | None = None  # the interval's train.loss where this iteration wrote a log record


class TrainingFeature:
    """Hooks of the training loop; each does nothing unless a feature overrides it."""

    # Where the feature's state_dict() goes in a checkpoint (None: it keeps no state across --resume).
    checkpoint_key: ClassVar[str | None] = None

    @classmethod
    def from_config(cls, config: Config, job: Job) -> TrainingFeature | None:
        """The feature for this run, or None when its flags leave it off. Refuse flags that cannot work here."""
        raise NotImplementedError

    @classmethod
    def metrics(cls, config: Config) -> dict[str, dict[str, int]]:
        """Report metrics the feature adds to a run of `config`: {prefix: {name: logger verbosity}}, e.g.
        {"val_ema": VAL_METRICS}. Registered with the run's parameters, before anything is built."""
        return {}

    def epoch_lr(self, job: Job, epoch: int, lr: float) -> float:
        """The learning rate of `epoch`, given the one --lr-schedule (or an earlier feature) chose."""
        return lr

    def start_epoch(self, job: Job, epoch: int) -> None:
        """Before the epoch's first iteration, after the LR schedule set the epoch's LR and the model went to
        training mode."""

    def after_step(self, job: Job, step: Step) -> None:
        """After every iteration's backward pass (and optimizer step, at the end of an accumulation)."""

    def end_epoch(self, job: Job, epoch: int, record: dict[str, float]) -> None:
        """After a whole training epoch, before its validation; `record` holds its train.* metrics so far."""

    def epoch_record(self, job: Job, epoch: int, record: dict[str, float]) -> None:
        """After the epoch's validation: `record` holds its train.* and (unless --training-only) val.* metrics, before
        it is logged and the epoch's checkpoint written."""

    def models_to_validate(self) -> list[tuple[str, nn.Module]]:
        """(report prefix, model) validated after the model itself, every validation (e.g. EMA's val_ema)."""
        return []

    def end_run(self, job: Job) -> dict[str, float]:
        """When the run has trained its last epoch (or stopped early, not by a signal); metrics for the summary."""
        return {}

    def state_dict(self) -> Any:
        """What a checkpoint keeps under `checkpoint_key`."""
        return None

    def load_state_dict(self, state: Any, checkpoint: Checkpoint, source: str) -> None:
        """Restore from a --resume checkpoint (`state`: its `checkpoint_key` entry, None when it has none);
        refuse, naming `source`, a checkpoint this run cannot continue."""

    @classmethod
    def check_absent(cls, state: Any, source: str) -> None:
        """A --resume checkpoint holds this feature's state, but the run does not use the feature: refuse, naming
        `source`, when that cannot continue the same training (by default the state is left behind)."""


# The training features, in the order their hooks run. Resolved when a run starts, so that this module imports
# none of them.
FEATURES: Registry[type[TrainingFeature]] = Registry("training feature")
FEATURES.register("stages", "image_classification.toolkit.progressive:Stages")
FEATURES.register("freeze", "image_classification.toolkit.finetune:Freeze")
FEATURES.register("divergence", "image_classification.train.divergence:DivergenceGuard")
FEATURES.register("exploding-loss", "image_classification.train.exploding_loss:ExplodingLoss")
FEATURES.register("ema", "image_classification.train.ema:EMA")
FEATURES.register("swa", "image_classification.toolkit.swa:SWA")
FEATURES.register("distillation", "image_classification.toolkit.distillation:Distillation")
