"""main.py's job run in the test process, deterministically: the in-process twin of a `main.py ...` command."""
from __future__ import annotations

import torch

from image_classification.arguments import parse_args


def train(argv: list[str]) -> dict:
    """The summary metrics of `main.py argv`, with torch's deterministic algorithms on for the run."""
    from image_classification.training import main
    torch.use_deterministic_algorithms(True)
    try:
        return main(parse_args(argv))
    finally:
        torch.use_deterministic_algorithms(False)
