"""Stage-wise progressive training (EfficientNetV2): image size and regularisation grow stage by stage.

The epochs are split into `n_stages` equal stages; from the first stage to the last, the training image
size, mixup alpha, CutMix alpha and RandAugment magnitude move linearly from their base to their final
values. With one stage only the final values are used (the base values have no effect).

    schedule = ProgressiveSchedule(epochs=350, n_stages=4, image_size=300, base_image_size=128,
                                   randaug_magnitude=30, base_randaug_magnitude=15)
    schedule.settings(epoch)   # StageSettings(stage, image_size, mixup, cutmix, randaug_magnitude)

The stage is a function of the epoch only, so a checkpoint's epoch is all a resumed run needs.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..cli import UserError
from ..config import Config
from ..data import train_loader_of
from ..data.loader import MAGNITUDE_BINS
from ..data.mixup import Mixup
from ..features import TrainingFeature
from ..models import get_entry

RANDAUG_MAX_MAGNITUDE = MAGNITUDE_BINS - 1  # the scale both data backends use (0..30)


@dataclass(frozen=True)
class StageSettings:
    """What one stage trains with."""

    stage: int
    image_size: int
    mixup: float
    cutmix: float
    randaug_magnitude: int


@dataclass(frozen=True)
class ProgressiveSchedule:
    """Linear schedule from the base settings (first stage) to the final ones (last stage)."""

    epochs: int
    n_stages: int
    image_size: int
    base_image_size: int
    mixup: float = 0.0
    base_mixup: float = 0.0
    cutmix: float = 0.0
    base_cutmix: float = 0.0
    randaug_magnitude: int = 9
    base_randaug_magnitude: int = 9

    def __post_init__(self):
        if self.n_stages < 1:
            raise UserError(f"--n-stages must be at least 1, got {self.n_stages}")
        if self.n_stages > self.epochs:
            raise UserError(f"--n-stages {self.n_stages} is more than --epochs {self.epochs}: every stage needs "
                             "at least one epoch")
        checks = [("--image-size", self.image_size, "size"), ("--mixup", self.mixup, "alpha"),
                  ("--cutmix", self.cutmix, "alpha"), ("--randaug-magnitude", self.randaug_magnitude, "magnitude")]
        if self.n_stages > 1:  # with one stage the base values are never used
            checks += [("--base-image-size", self.base_image_size, "size"), ("--base-mixup", self.base_mixup, "alpha"),
                       ("--base-cutmix", self.base_cutmix, "alpha"),
                       ("--base-randaug-magnitude", self.base_randaug_magnitude, "magnitude")]
        for flag, value, kind in checks:
            if kind == "size" and value < 1:
                raise UserError(f"{flag} must be positive, got {value}")
            if kind == "alpha" and value < 0:
                raise UserError(f"{flag} alpha must be >= 0 (0 disables), got {value}")
            if kind == "magnitude" and not 0 <= value <= RANDAUG_MAX_MAGNITUDE:
                raise UserError(f"{flag} must be between 0 and {RANDAUG_MAX_MAGNITUDE}, got {value}")

    def stage_of(self, epoch: int) -> int:
        """Index of the stage that `epoch` (0-based) belongs to."""
        return min(epoch * self.n_stages // self.epochs, self.n_stages - 1)

    def settings(self, epoch: int) -> StageSettings:
        """Image size and augmentation strengths for `epoch`."""
        stage = self.stage_of(epoch)
        t = stage / (self.n_stages - 1) if self.n_stages > 1 else 1.0

        def interpolate(base: float, final: float) -> float:
            return base * (1.0 - t) + final * t  # exact at both ends

        return StageSettings(
            stage=stage,
            image_size=int(round(interpolate(self.base_image_size, self.image_size))),
            mixup=interpolate(self.base_mixup, self.mixup),
            cutmix=interpolate(self.base_cutmix, self.cutmix),
            randaug_magnitude=int(round(interpolate(self.base_randaug_magnitude, self.randaug_magnitude))),
        )

    @property
    def max_mixup(self) -> float:
        """The largest mixup alpha of any stage."""
        return max(self.mixup, self.base_mixup) if self.n_stages > 1 else self.mixup

    @property
    def max_cutmix(self) -> float:
        """The largest CutMix alpha of any stage."""
        return max(self.cutmix, self.base_cutmix) if self.n_stages > 1 else self.cutmix

    def mixes(self) -> bool:
        """Whether any stage mixes batches (mixup or CutMix), i.e. training needs soft targets."""
        return self.max_mixup > 0 or self.max_cutmix > 0


def progressive_schedule(config: Config, default_image_size: int) -> ProgressiveSchedule:
    """A job's schedule; unset base values default to the final ones (sizes, magnitude) or 0. --evaluate trains no
    stage, so its --epochs (often 1) need not hold --n-stages."""
    data, schedule = config.data, config.schedule
    image_size = data.image_size or default_image_size
    if config.runtime.evaluate:
        return ProgressiveSchedule(epochs=max(schedule.epochs, 1), n_stages=1, image_size=image_size,
                                   base_image_size=image_size, mixup=config.loss.mixup, cutmix=config.loss.cutmix,
                                   randaug_magnitude=data.randaug_magnitude,
                                   base_randaug_magnitude=data.randaug_magnitude)
    return ProgressiveSchedule(
        epochs=schedule.epochs, n_stages=schedule.n_stages, image_size=image_size,
        base_image_size=schedule.base_image_size if schedule.base_image_size is not None else image_size,
        mixup=config.loss.mixup, base_mixup=schedule.base_mixup, cutmix=config.loss.cutmix,
        base_cutmix=schedule.base_cutmix, randaug_magnitude=data.randaug_magnitude,
        base_randaug_magnitude=(schedule.base_randaug_magnitude if schedule.base_randaug_magnitude is not None
                                else data.randaug_magnitude))


class Stages(TrainingFeature):
    """The training feature that trains each epoch with its stage's settings: at a stage's first epoch the train
    loader is rebuilt at the stage's image size (and RandAugment magnitude) and the batch mixing gets the stage's
    strengths; each epoch's record says its image size (train.image_size). With one stage: the flags' settings
    throughout."""

    def __init__(self, config: Config, schedule: ProgressiveSchedule, built_for: StageSettings) -> None:
        self.config = config
        self.schedule = schedule
        self.built_for = built_for   # what the job's train loader was built for
        self.current: StageSettings | None = None

    @classmethod
    def from_config(cls, config: Config, job) -> "Stages | None":
        if job.train_loader is None:
            return None
        schedule = progressive_schedule(config, get_entry(config.model.arch).default_image_size)
        return cls(config, schedule, schedule.settings(min(job.state.epoch, schedule.epochs - 1)))

    def start_epoch(self, job, epoch: int) -> None:
        settings = self.schedule.settings(epoch)
        if settings == self.current:
            return
        if self._loader_key(settings) != self._loader_key(self.built_for):
            job.train_loader.close()
            job.train_loader = stage_train_loader(self.config, job.ctx, settings, job.state.data_seed)
        job.trainer.mixup = batch_mixer(settings, self.schedule, self.config.model.num_classes)
        if self.schedule.n_stages > 1:
            magnitude = f", randaug magnitude {settings.randaug_magnitude}" \
                if self.config.data.augmentation == "randaugment" else ""
            job.logger.print(f"=> stage {settings.stage + 1}/{self.schedule.n_stages}: train image size "
                             f"{settings.image_size}, mixup {settings.mixup:g}, cutmix {settings.cutmix:g}{magnitude}")
        self.current = self.built_for = settings

    def end_epoch(self, job, epoch: int, record: dict[str, float]) -> None:
        record["train.image_size"] = self.schedule.settings(epoch).image_size

    def _loader_key(self, settings: StageSettings) -> tuple:
        # What the train loader is built from: the magnitude only matters to RandAugment.
        return settings.image_size, settings.randaug_magnitude if self.config.data.augmentation == "randaugment" \
            else None


def stage_train_loader(config: Config, ctx, settings: StageSettings, seed: int):
    """The training loader of one stage: its image size and RandAugment magnitude, the run's data order."""
    return train_loader_of(config.data, ctx, num_classes=config.model.num_classes, seed=seed,
                           image_size=settings.image_size, randaug_magnitude=settings.randaug_magnitude,
                           **get_entry(config.model.arch).preprocessing.normalization)


def batch_mixer(settings: StageSettings, schedule: ProgressiveSchedule, num_classes: int) -> Mixup | None:
    """The stage's mixup/CutMix, or None when no stage of the run mixes (integer targets throughout)."""
    if not schedule.mixes():
        return None
    return Mixup(settings.mixup, num_classes, cutmix=settings.cutmix)
