"""Optimizers of the reference: SGD or RMSprop, with BatchNorm parameters excluded from weight decay."""
from __future__ import annotations

import torch
from torch import nn

from .cli import UserError


def parameter_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool = False,
                     optimizer: str = "sgd") -> list[dict]:
    """The reference's groups: parameters named like "*bn*" first, with weight decay 0 unless `bn_weight_decay`,
    then the rest.

    With `bn_weight_decay` the reference's SGD puts everything in one group while its RMSprop keeps the two
    (both decayed); the same groups in the same order let its optimizer states load into ours and ours into it.
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if bn_weight_decay and optimizer == "sgd":
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    bn_params = [p for name, p in params if "bn" in name]
    other_params = [p for name, p in params if "bn" not in name]
    return [{"params": bn_params, "weight_decay": weight_decay if bn_weight_decay else 0.0},
            {"params": other_params, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, *, optimizer: str, lr: float, momentum: float, weight_decay: float,
                    nesterov: bool = False, bn_weight_decay: bool = False, rmsprop_alpha: float = 0.9,
                    rmsprop_eps: float = 1e-3) -> torch.optim.Optimizer:
    """torch.optim.SGD or torch.optim.RMSprop over the reference's parameter groups."""
    groups = parameter_groups(model, weight_decay, bn_weight_decay, optimizer)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if optimizer == "rmsprop":
        if nesterov:
            raise UserError("--nesterov applies to --optimizer sgd only")
        return torch.optim.RMSprop(groups, lr=lr, alpha=rmsprop_alpha, eps=rmsprop_eps, momentum=momentum,
                                   weight_decay=weight_decay)
    raise UserError(f"--optimizer must be sgd or rmsprop, got {optimizer!r}")


def optimizer_from_args(model: nn.Module, args) -> torch.optim.Optimizer:
    """build_optimizer with main.py's flags."""
    return build_optimizer(model, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, nesterov=args.nesterov,
                           bn_weight_decay=args.bn_weight_decay, rmsprop_alpha=args.rmsprop_alpha,
                           rmsprop_eps=args.rmsprop_eps)
