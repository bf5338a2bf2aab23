"""Optimizers over the reference's parameter groups (BatchNorm without weight decay): its SGD and RMSprop, and
AdamW and LAMB (not in the reference).

An optimizer is one entry of OPTIMIZERS: a function of (parameter groups, OptimizerConfig) to a
torch.optim.Optimizer; --optimizer's choices and its error message come from the registry.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..cli import UserError
from ..config import Config, OptimizerConfig
from ..registry import Registry
from ..toolkit.finetune import lr_scales
from .lamb import Lamb

OPTIMIZERS: Registry[Callable[[list[dict], OptimizerConfig], torch.optim.Optimizer]] = Registry(
    "optimizer", flag="--optimizer")


ADAM_BETAS = (0.9, 0.999)


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    _refuse_other_optimizers_flags(config)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=config.nesterov)


@OPTIMIZERS.register("rmsprop")
def rmsprop(groups: list[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    _refuse_other_optimizers_flags(config)
    return torch.optim.RMSprop(groups, lr=config.lr, alpha=config.rmsprop_alpha, eps=config.rmsprop_eps,
                               momentum=config.momentum, weight_decay=config.weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    """torch's AdamW: weight decay decoupled from the gradient's moments."""
    _refuse_other_optimizers_flags(config)
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.adam_betas or ADAM_BETAS),
                             eps=1e-8 if config.adam_eps is None else config.adam_eps, weight_decay=config.weight_decay)


@OPTIMIZERS.register("lamb")
def lamb(groups: list[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    """LAMB (lamb.py): Adam with a per-tensor trust ratio, for large batches."""
    _refuse_other_optimizers_flags(config)
    return Lamb(groups, lr=config.lr, betas=tuple(config.adam_betas or ADAM_BETAS),
                eps=1e-6 if config.adam_eps is None else config.adam_eps, weight_decay=config.weight_decay)


def _refuse_other_optimizers_flags(config: OptimizerConfig) -> None:
    """A flag of another optimizer would do nothing: refuse it in one line."""
    if config.nesterov and config.optimizer != "sgd":
        raise UserError("--nesterov applies to --optimizer sgd only")
    given = [flag for flag, value in (("--adam-betas", config.adam_betas), ("--adam-eps", config.adam_eps))
             if value is not None]
    if given and config.optimizer not in ("adamw", "lamb"):
        raise UserError(f"{' and '.join(given)} apply to --optimizer adamw and lamb, not {config.optimizer}")


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
                    rmsprop_eps: float = 1e-3, lr_scales: Mapping[str, float] | None = None) -> torch.optim.Optimizer:
    """`optimizer` (an OPTIMIZERS name) over the reference's parameter groups (split by `lr_scales`)."""
    settings = OptimizerConfig(optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               bn_weight_decay=bn_weight_decay, nesterov=nesterov, rmsprop_alpha=rmsprop_alpha,
                               rmsprop_eps=rmsprop_eps)
    return optimizer_of(model, settings, lr_scales)


def optimizer_of(model: nn.Module, settings: OptimizerConfig, lr_scales: Mapping[str, float] | None = None
                 ) -> torch.optim.Optimizer:
    """settings.optimizer over the reference's parameter groups (split by `lr_scales`)."""
    build = OPTIMIZERS.get(settings.optimizer)
    groups = parameter_groups(model, settings.weight_decay, settings.bn_weight_decay, settings.optimizer, lr_scales)
    return build(groups, settings)


def job_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """A job's optimizer, with the fine-tuning LR factors of --layer-decay and --head-lr-scale."""
    scales = lr_scales(model, layer_decay=config.finetune.layer_decay, head_lr_scale=config.finetune.head_lr_scale,
                       arch=config.model.arch)
    return optimizer_of(model, config.optim, scales)
