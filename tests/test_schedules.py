"""Learning-rate schedules (train/schedules.py)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from image_classification.train.schedules import lr_at

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("schedule,expected", [
    ("step", [0.1] * 30 + [0.01] * 30 + [0.001] * 20 + [0.0001] * 10),
    ("linear", [0.1 * (1 - e / 90) for e in range(90)]),
    ("cosine", [0.5 * (1 + math.cos(math.pi * e / 90)) * 0.1 for e in range(90)]),
    ("exponential", [0.1 * 0.97 ** e for e in range(90)]),
])
def test_lr_schedules_per_epoch(schedule, expected):
    got = [lr_at(e, schedule=schedule, base_lr=0.1, epochs=90) for e in range(90)]
    assert got == pytest.approx(expected)


def test_lr_warmup_and_cosine_end_lr():
    lrs = [lr_at(e, schedule="cosine", base_lr=0.08, epochs=10, warmup=4, end_lr=0.001) for e in range(10)]
    assert lrs[:4] == pytest.approx([0.02, 0.04, 0.06, 0.08])
    assert lrs[4] == pytest.approx(0.08)
    assert lrs[7] == pytest.approx(0.001 + 0.5 * (1 + math.cos(math.pi * 3 / 6)) * 0.079)
    assert lr_at(4, schedule="linear", base_lr=0.1, epochs=10, warmup=2) == pytest.approx(0.1 * (1 - 2 / 8))
