"""main.py's job run in the test process, deterministically: the in-process twin of a `main.py ...` command."""
from __future__ import annotations

import torch

from image_classification.arguments import parse_config


def train(argv: list[str]) -> dict:
    """The summary metrics of `main.py argv`, with torch's deterministic algorithms on for the run."""
    from image_classification.train import run
    torch.use_deterministic_algorithms(True)
    try:
        return run(parse_config(argv))
    finally:
        torch.use_deterministic_algorithms(False)
