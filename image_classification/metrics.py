"""Accuracy, and metrics that accumulate on the device and are reduced across processes only when read.

The training step never calls `.item()`: sums stay tensors on the device (no host sync per step) and
are turned into numbers, all-reduced across ranks, at print frequency and at the end of a phase.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from .logger import DEFAULT, VERBOSE

# The report's metrics in the reference's registration order, with its verbosity levels; image_size (per epoch: the
# training resolution, which progressive training changes), bad_files (per epoch: the unreadable images met,
# replaced in training, left out of validation), compute_latency_at90 and first_batch_latency are this suite's.
TRAIN_METRICS = {"loss": DEFAULT, "compute_ips": DEFAULT, "total_ips": DEFAULT, "data_time": VERBOSE,
                 "compute_time": VERBOSE, "lr": DEFAULT, "grad_scale": DEFAULT, "image_size": VERBOSE,
                 "bad_files": VERBOSE}
VAL_METRICS = {"top1": DEFAULT, "top5": DEFAULT, "loss": DEFAULT, "compute_ips": DEFAULT, "total_ips": DEFAULT,
               "data_time": VERBOSE, "compute_latency": DEFAULT, "compute_latency_at100": VERBOSE,
               "compute_latency_at99": VERBOSE, "compute_latency_at95": VERBOSE, "compute_latency_at90": VERBOSE,
               "first_batch_latency": VERBOSE, "bad_files": VERBOSE}


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (a float tensor of len(ks))."""
    maxk = min(max(ks), logits.shape[1])
    _, pred = logits.topk(maxk, dim=1, largest=True, sorted=True)
    hit = pred.eq(target.view(-1, 1))
    return torch.stack([hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]).float()


def accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Top-k accuracies in percent (a convenience for tests and scripts; syncs with the host)."""
    correct = topk_correct(logits, target, ks)
    return (correct * (100.0 / target.shape[0])).tolist()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over all processes (the tensor itself when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_floats(values: list[float], device: torch.device) -> list[float]:
    """Every process's `values` concatenated (all processes must pass the same length)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor)
        tensor = torch.cat(gathered)
    return tensor.tolist()


class SumMeter:
    """Weighted sums of several named values, kept as one device tensor; `.averages()` reduces across ranks."""

    def __init__(self, names: list[str], device: torch.device):
        self.names = list(names)
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, values: torch.Tensor, count: int | torch.Tensor) -> None:
        """`values`: per-name sums over `count` samples (e.g. loss·batch, correct top-1 count)."""
        self.sums += values.detach().to(torch.float64)
        self.count += count

    def state_dict(self) -> dict:
        """This process's sums as plain floats (exact: they are float64), for a checkpoint taken mid-phase."""
        return {"sums": self.sums.tolist(), "count": float(self.count)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s sums."""
        self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.device)
        self.count = torch.tensor(state["count"], dtype=torch.float64, device=self.device)

    def averages(self, distributed: bool = True) -> dict[str, float]:
        """Per-sample averages, over all processes when `distributed` (one host sync)."""
        packed = torch.cat([self.sums, self.count.view(1)])
        if distributed:
            packed = all_reduce_sum(packed)
        values = packed.tolist()
        count = values[-1]
        return {name: (value / count if count else float("nan")) for name, value in zip(self.names, values[:-1])}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation (numpy's default), NaN when empty."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
