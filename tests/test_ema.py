"""The exponential moving average of the weights (train/ema.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runs import needs_data_module, run_args, train
from torch import nn

from image_classification.train.ema import EMA, ema_decay

ROOT = Path(__file__).resolve().parents[1]


def test_ema_update_formula_skips_num_batches_tracked():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(model, 0.999)
    shadow0 = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model, step=3)
    mu = ema_decay(0.999, 3)
    assert mu == pytest.approx(4 / 13)
    for name, value in ema.state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert value.item() == 0
        else:
            torch.testing.assert_close(value, mu * shadow0[name] + (1 - mu) * model.state_dict()[name])
    assert ema_decay(0.999, 10**6) == 0.999


@pytest.mark.slow
def test_ema_moves_every_iteration_counted_over_the_run_also_between_accumulated_steps(tmp_path, monkeypatch):
    """The reference's cadence: ema(model, epoch * steps_per_epoch + i) after every iteration."""
    needs_data_module()
    from image_classification.data.synthetic import TRAIN_BATCHES
    steps = []
    update = EMA.update
    monkeypatch.setattr(EMA, "update", lambda self, model, step: (steps.append(step), update(self, model, step)))
    train(run_args(tmp_path, "--use-ema", "0.9", "--optimizer-batch-size", "8", "--no-checkpoints"))
    assert steps == [0, 1, 2, TRAIN_BATCHES, TRAIN_BATCHES + 1, TRAIN_BATCHES + 2]  # --prof 3 of each epoch
