"""A warning when an epoch's losses are far above chance: what ImageNet's defaults do on a few thousand images.

There, --lr 0.1 over a handful of steps per epoch and --bn_momentum 0.01 (BatchNorm's running statistics still near
their start after an epoch of 30 steps) give a validation loss of 1e4 to 1e13 at chance accuracy: nothing diverges to
NaN, so the divergence guard stays quiet, and without this line the run looks like it trains. With -b 256 the first
epochs look normal (3 steps each on 1,000 images) and validation explodes later: measured on the generated dataset,
val.loss 2.3 after epoch 0, 8.7 after epoch 7, 1.3e5 after epoch 19, at chance top-1 throughout.
"""
from __future__ import annotations

import math

from ..config import Config
from ..features import TrainingFeature
from .checks import warn

# train.loss above this multiple of chance's, ln(classes), or val.loss above VAL_LIMIT, at the end of an epoch.
TRAIN_FACTOR = 10
VAL_LIMIT = 1e3


class ExplodingLoss(TrainingFeature):
    """The training feature that checks each epoch's losses and, the first time they exploded, names the flags that
    usually explain them. On in every training run; it only warns, once."""

    def __init__(self) -> None:
        self.warned = False

    @classmethod
    def from_config(cls, config: Config, job) -> "ExplodingLoss | None":
        return None if job.trainer.optimizer is None else cls()

    def epoch_record(self, job, epoch: int, record: dict[str, float]) -> None:
        if self.warned:
            return
        classes = job.config.model.num_classes
        chance = math.log(max(classes, 2))
        # train.loss is divided by the accumulation, as the reference logs it.
        train = record["train.loss"] * job.trainer.accumulation
        val = record.get("val.loss")
        exploded = [f"train.loss {train:.3g}"] if train > TRAIN_FACTOR * chance else []
        if val is not None and not val <= VAL_LIMIT:  # also NaN and infinity
            exploded.append(f"val.loss {val:.3g}")
        if exploded:
            self.warned = True
            warn(job.ctx, f"the loss exploded in epoch {epoch} ({', '.join(exploded)}; chance is ln({classes}) = "
                          f"{chance:.2f}): ImageNet's defaults do this on small data; try a lower --lr, --bn_momentum "
                          "0.1 and a -b that leaves 30 or more steps per epoch (README.md, \"Small data\")")
