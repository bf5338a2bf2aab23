"""The training step (train/epoch.py, train/state.py): accumulation and fp16 skipped steps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from image_classification.context import create_context
from image_classification.train.losses import (
    LabelSmoothing,
)
from image_classification.train.optimizers import build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def _bn_free_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_gradient_accumulation_of_two_batches_equals_one_double_batch():
    from image_classification.train.epoch import train_step
    from image_classification.train.losses import TrainingLoss
    from image_classification.train.state import Trainer
    ctx = create_context(device="cpu")
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    models = []
    for accumulation, batches in ((2, [(x[:4], y[:4]), (x[4:], y[4:])]), (1, [(x, y)])):
        model = _bn_free_model()
        optimizer = build_optimizer(model, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
        engine = Trainer(ctx=ctx, model=model, train_model=model, loss=TrainingLoss(LabelSmoothing(0.1)),
                         optimizer=optimizer, scaler=ctx.grad_scaler(), accumulation=accumulation)
        engine.loss.criterion.train()
        for _ in range(2):  # two optimizer steps, so momentum is exercised too
            for i, (images, target) in enumerate(batches):
                train_step(engine, images, target, optimizer_step=(i + 1) % accumulation == 0)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_accumulation_must_divide():
    from image_classification.train.setup import accumulation_steps
    assert accumulation_steps(-1, 256, 8) == 1
    assert accumulation_steps(4096, 256, 8) == 2
    with pytest.raises(ValueError, match="multiple of world size x batch size = 8 x 256 = 2048"):
        accumulation_steps(3000, 256, 8)


def test_fp16_skipped_steps_are_normal_until_too_many_in_a_row():
    from image_classification.train.divergence import (
        MAX_SKIPPED_STEPS,
        DivergenceError,
        DivergenceGuard,
    )
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # The fp16 path's scaler, on CPU, started high enough to halve 200 times without reaching 0.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100, enabled=True)
    guard = DivergenceGuard(scaler, "causes")
    x = torch.ones(1, 2)

    def step(factor: float) -> None:
        loss = model(x).sum() * factor
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        guard.after_optimizer_step(0, 1)
        guard.check_loss(loss.item(), 0, 1)  # a non-finite loss is the scaler's business here

    for _ in range(MAX_SKIPPED_STEPS - 1):
        step(float("inf"))
    step(1.0)  # one finite step resets the count
    assert guard.skipped_steps == 0
    for _ in range(MAX_SKIPPED_STEPS - 1):
        step(float("nan"))
    with pytest.raises(DivergenceError, match=f"not finite for {MAX_SKIPPED_STEPS} steps in a row"):
        step(float("nan"))
    # Without loss scaling the first non-finite loss the loop reads stops the run.
    plain = DivergenceGuard(torch.amp.GradScaler("cpu", enabled=False), "a learning rate too high (--lr)")
    plain.check_loss(2.5, 0, 10)
    with pytest.raises(DivergenceError, match=r"epoch 0, iteration 20: the training loss is nan \(last finite "
                                              r"loss 2.50000 at epoch 0, iteration 10\); likely causes: a learning"):
        plain.check_loss(float("nan"), 0, 20)
