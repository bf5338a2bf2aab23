"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"): Adam's step rescaled per parameter tensor by
the trust ratio ||w|| / ||update||, so that every layer moves by a similar fraction of its weights at large batches.

torch has no LAMB. This one computes timm's Lamb (timm/optim/lamb.py) with its defaults but one: bias correction,
gradient averaging (the first moment takes (1 - beta1) of the gradient), weight decay added to the update before
the trust ratio, the ratio applied to tensors with weight decay only (the reference's parameter groups give
BatchNorm's weights none, as LAMB's implementations exclude them) and 1 where either norm is 0. timm clips the
global gradient norm to 1 inside its step by default; here that is --clip-grad's job, for every optimizer.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class Lamb(torch.optim.Optimizer):
    """LAMB over `params` (tensors or parameter groups)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"LAMB needs lr >= 0, eps > 0, weight_decay >= 0 and betas in [0, 1), got lr {lr}, "
                             f"eps {eps}, weight_decay {weight_decay}, betas {tuple(betas)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One LAMB step for every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # timm's operations in timm's order, so that the two agree to the last bits.
                exp_avg.lerp_(p.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denominator = (exp_avg_sq.sqrt() / (1 - beta2 ** state["step"]) ** 0.5).add_(group["eps"])
                update = (exp_avg / (1 - beta1 ** state["step"])).div_(denominator)
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                    weight_norm, update_norm = p.norm(2.0), update.norm(2.0)
                    one = torch.ones_like(weight_norm)
                    trust_ratio = torch.where(weight_norm > 0,
                                              torch.where(update_norm > 0, weight_norm / update_norm, one), one)
                    update.mul_(trust_ratio)
                p.add_(update, alpha=-group["lr"])
        return loss
