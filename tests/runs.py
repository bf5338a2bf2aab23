"""main.py's job run in the test process, deterministically: the in-process twin of a `main.py ...` command."""
from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest
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


SIZE = 32  # image size of the tiny runs


def run_args(workspace: Path, *extra: str) -> list[str]:
    """A tiny efficientnet-b0 run on the synthetic backend."""
    return ["--arch", "efficientnet-b0", "--data-backend", "synthetic", "--image-size", str(SIZE), "-b", "4",
            "--num_classes", "4", "--workers", "0", "--epochs", "2", "--print-freq", "2", "--seed", "3",
            "--optimizer", "rmsprop", "--lr", "0.01", "--rmsprop-eps", "0.01", "--lr-schedule", "cosine",
            "--warmup", "1", "--prof", "3", "--workspace", str(workspace), *extra]


def folder_args(data: Path, workspace: Path, *extra: str) -> list[str]:
    """A tiny efficientnet-b0 run on an image folder with the pytorch backend (8 batches of 4 per epoch on
    conftest's tiny_data)."""
    return [str(data), "--arch", "efficientnet-b0", "--data-backend", "pytorch", "--image-size", str(SIZE), "-b",
            "4", "--num_classes", "4", "--workers", "0", "--epochs", "2", "--print-freq", "2", "--seed", "3",
            "--optimizer", "rmsprop", "--lr", "0.01", "--rmsprop-eps", "0.01", "--lr-schedule", "cosine",
            "--warmup", "1", "--workspace", str(workspace), *extra]


def needs_data_module():
    """End-to-end runs use the real data pipelines (synthetic backend)."""
    pytest.importorskip("image_classification.data", reason="image_classification.data has not landed yet")


def float_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of a checkpoint: model, EMA and optimizer state."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    out = {f"state_dict.{k}": v for k, v in saved["state_dict"].items() if v.is_floating_point()}
    out.update({f"state_dict_ema.{k}": v for k, v in (saved.get("state_dict_ema") or {}).items()
                if v.is_floating_point()})
    for index, values in saved["optimizer"]["state"].items():
        out.update({f"optimizer.{index}.{k}": v for k, v in values.items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()})
    return out


def stop_at_iteration(monkeypatch, stop_after: int) -> None:
    """Deliver SIGTERM to this process during training step number `stop_after` (counted from 1, this run)."""
    from image_classification.train import epoch as training
    real_step = training.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_after:
            signal.raise_signal(signal.SIGTERM)  # StopRequest's handler only sets its flag
        return real_step(*args, **kwargs)
    monkeypatch.setattr(training, "train_step", step)


def free_port() -> int:
    """A port nobody listens on now, for a process group's rendezvous: other tests (pytest-xdist's other worker,
    another test run on this machine) start process groups too, so none takes a fixed port such as 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
