"""Accuracy, percentiles and validation's timing (metrics.py, train/validate.py)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from image_classification.context import create_context
from image_classification.logger import Logger
from image_classification.metrics import accuracy, percentile

ROOT = Path(__file__).resolve().parents[1]


def test_topk_accuracy_and_percentiles():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 1])
    assert accuracy(logits, target, (1, 2)) == pytest.approx([100 / 3, 200 / 3])
    values = sorted(float(i) for i in range(1, 101))
    assert percentile(values, 100) == 100 and percentile(values, 90) == pytest.approx(90.1)
    assert math.isnan(percentile([], 95))


def test_validation_reports_the_warm_up_batch_apart(monkeypatch):
    """Latencies and compute speed are the steady batches'; the first (cuDNN search, compilation) has its own."""
    from image_classification.data.synthetic import SyntheticLoader
    from image_classification.train import validate as validation
    clock = [0.0]
    monkeypatch.setattr(validation.time, "perf_counter", lambda: clock[0])

    class Timed(nn.Module):  # the first forward costs 10 s of the fake clock, each later one 1 s
        def __init__(self):
            super().__init__()
            self.calls, self.fc = 0, nn.Linear(3, 4)

        def forward(self, x):
            self.calls += 1
            clock[0] += 10.0 if self.calls == 1 else 1.0
            return self.fc(x.mean((2, 3)))

    ctx = create_context(device="cpu")
    loader = SyntheticLoader(image_size=8, batch_size=2, ctx=ctx, num_classes=4, batches_per_epoch=5)
    options = validation.EvalOptions(prof=-1, topk=5, print_freq=10, tta="none")
    result = validation.validate(Timed(), loader, ctx, Logger(None, enabled=False), options)
    assert result["val.first_batch_latency"] == 10.0
    assert result["val.compute_latency"] == result["val.compute_latency_at100"] == 1.0
    assert result["val.compute_ips"] == 2.0  # 8 images of the 4 steady batches in 4 s
    assert result["val.total_ips"] == 10 / 14.0
