"""What a job would otherwise do silently with settings that do not suit it: each becomes a one-line error before
the first step.

    check_sync_bn(config, ctx)                              --sync-bn needs CUDA
"""
from __future__ import annotations

from ..cli import UserError
from ..config import Config
from ..context import ExecutionContext


def check_sync_bn(config: Config, ctx: ExecutionContext) -> None:
    """--sync-bn on a machine without CUDA: one line (torch's SyncBatchNorm computes on GPUs only)."""
    if config.model.sync_bn and not ctx.is_cuda:
        raise UserError(f"--sync-bn: torch.nn.SyncBatchNorm runs on CUDA GPUs only, this run is on {ctx.device.type} "
                        "(BatchNorm in one process already sees its whole batch); drop --sync-bn")
