"""Optimizers and their parameter groups (train/optimizers.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from image_classification.train.optimizers import build_optimizer, parameter_groups

ROOT = Path(__file__).resolve().parents[1]


def test_bn_parameters_get_no_weight_decay():
    from image_classification.models import get_entry
    model = get_entry("efficientnet-b0")(num_classes=4)
    groups = parameter_groups(model, 1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert groups[0]["weight_decay"] == 0.0 and all("bn" in names[id(p)] for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 1e-5 and not any("bn" in names[id(p)] for p in groups[1]["params"])
    # --bn-weight-decay: the reference's SGD takes one group, its RMSprop keeps both groups, both decayed.
    assert len(parameter_groups(model, 1e-5, bn_weight_decay=True)) == 1
    both = build_optimizer(model, optimizer="rmsprop", lr=0.1, momentum=0.9, weight_decay=1e-5, bn_weight_decay=True)
    assert [len(g["params"]) for g in both.param_groups] == [len(g["params"]) for g in groups]
    assert [g["weight_decay"] for g in both.param_groups] == [1e-5, 1e-5]
    opt = build_optimizer(model, optimizer="rmsprop", lr=0.1, momentum=0.9, weight_decay=1e-5, rmsprop_alpha=0.8,
                          rmsprop_eps=0.01)
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults["alpha"] == 0.8 and opt.defaults["eps"] == 0.01
