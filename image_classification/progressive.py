"""Stage-wise progressive training (EfficientNetV2): image size and regularisation grow stage by stage.

The epochs are split into `n_stages` equal stages; from the first stage to the last, the training image
size, mixup alpha, CutMix alpha and RandAugment magnitude move linearly from their base to their final
values. With one stage only the final values are used.
"""
from __future__ import annotations

from dataclasses import dataclass


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
            raise ValueError(f"--n-stages must be at least 1, got {self.n_stages}")
        if self.n_stages > self.epochs:
            raise ValueError(f"--n-stages {self.n_stages} is more than --epochs {self.epochs}: every stage needs "
                             "at least one epoch")

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
