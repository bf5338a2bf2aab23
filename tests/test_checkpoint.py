"""The checkpoint format (checkpoint.py): RNG state, the writer's refusal of non-finite weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from image_classification import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def test_rng_state_round_trip_is_weights_only():
    torch.manual_seed(0), np.random.seed(0)
    import random
    random.seed(0)
    state = ckpt.capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    buffer = __import__("io").BytesIO()
    torch.save({"rng": state}, buffer)
    buffer.seek(0)
    ckpt.restore_rng_state(torch.load(buffer, weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_checkpoint_writer_refuses_non_finite_weights(tmp_path):
    writer = ckpt.CheckpointWriter(tmp_path)
    writer.save(ckpt.Checkpoint(epoch=1, state_dict={"w": torch.ones(2)}), is_best=True)
    with pytest.raises(ckpt.CheckpointError, match=r"state_dict w holds NaN or infinite values"):
        writer.save(ckpt.Checkpoint(epoch=2, state_dict={"w": torch.tensor([1.0, float("nan")])}), is_best=True)
    with pytest.raises(ckpt.CheckpointError, match=r"state_dict_ema w"):
        writer.save(ckpt.Checkpoint(epoch=2, state_dict={"w": torch.ones(2)},
                                    extras={"state_dict_ema": {"w": torch.full((2,), float("inf"))}}), is_best=False)
    for name in ("checkpoint.pth.tar", "model_best.pth.tar"):
        assert torch.load(tmp_path / name, weights_only=True)["epoch"] == 1