"""A BN-free model for multi-process tests, `--arch tiny-bn-free` once `register()` has run.

Worker scripts started by the tests (multiproc.py, srun-like and torchrun runs) register it before main.py, so that
runs of 1 and 2 processes on the same global batch give the same weights (no BatchNorm statistics per rank).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from image_classification import models
from image_classification.preprocessing import REFERENCE

NAME = "tiny-bn-free"


class TinyEntry:
    """A BN-free model with a fixed initialisation, behind the registry's entry-point interface."""

    name = NAME
    default_image_size = 8
    default_eval_image_size = 8
    preprocessing = REFERENCE

    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False)
        p.add_argument("--num_classes", type=int, default=3)
        return p

    def __call__(self, num_classes: int = 3) -> nn.Module:
        g = torch.Generator().manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(6, num_classes))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return model


def register() -> None:
    models.register(NAME, TinyEntry())
