"""Optimizers of the reference: SGD or RMSprop, with BatchNorm parameters excluded from weight decay."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .cli import UserError
from .finetune import lr_scales


def parameter_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool = False,
                     optimizer: str = "sgd", lr_scales: Mapping[str, float] | None = None) -> list[dict]:
    """The reference's groups: parameters named like "*bn*" first, with weight decay 0 unless `bn_weight_decay`,
    then the rest; frozen parameters (requires_grad False) left out.

    With `bn_weight_decay` the reference's SGD puts everything in one group while its RMSprop keeps the two
    (both decayed); the same groups in the same order let its optimizer states load into ours and ours into it.
    `lr_scales` (parameter name -> LR factor, finetune.lr_scales) splits each group by factor, in the order the
    factors first appear, each split carrying its factor as `lr_scale` for the LR schedule.
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if bn_weight_decay and optimizer == "sgd":
        layout = [(params, weight_decay)]
    else:
        layout = [([(n, p) for n, p in params if "bn" in n], weight_decay if bn_weight_decay else 0.0),
                  ([(n, p) for n, p in params if "bn" not in n], weight_decay)]
    if lr_scales is None:
        return [{"params": [p for _, p in members], "weight_decay": decay} for members, decay in layout]
    groups = []
    for members, decay in layout:
        by_scale: dict[float, list] = {}
        for name, p in members:
            by_scale.setdefault(lr_scales[name], []).append(p)
        groups += [{"params": ps, "weight_decay": decay, "lr_scale": scale} for scale, ps in by_scale.items()]
    return groups


def build_optimizer(model: nn.Module, *, optimizer: str, lr: float, momentum: float, weight_decay: float,
                    nesterov: bool = False, bn_weight_decay: bool = False, rmsprop_alpha: float = 0.9,
                    rmsprop_eps: float = 1e-3, lr_scales: Mapping[str, float] | None = None
                    ) -> torch.optim.Optimizer:
    """torch.optim.SGD or torch.optim.RMSprop over the reference's parameter groups (split by `lr_scales`)."""
    groups = parameter_groups(model, weight_decay, bn_weight_decay, optimizer, lr_scales)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if optimizer == "rmsprop":
        if nesterov:
            raise UserError("--nesterov applies to --optimizer sgd only")
        return torch.optim.RMSprop(groups, lr=lr, alpha=rmsprop_alpha, eps=rmsprop_eps, momentum=momentum,
                                   weight_decay=weight_decay)
    raise UserError(f"--optimizer must be sgd or rmsprop, got {optimizer!r}")


def optimizer_from_args(model: nn.Module, args) -> torch.optim.Optimizer:
    """build_optimizer with main.py's flags (the fine-tuning LR factors included)."""
    scales = lr_scales(model, layer_decay=args.layer_decay, head_lr_scale=args.head_lr_scale, arch=args.arch)
    return build_optimizer(model, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, nesterov=args.nesterov,
                           bn_weight_decay=args.bn_weight_decay, rmsprop_alpha=args.rmsprop_alpha,
                           rmsprop_eps=args.rmsprop_eps, lr_scales=scales)
