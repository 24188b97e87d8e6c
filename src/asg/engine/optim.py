"""Optimizers over layer groups: torch SGD, the official "learning rate inside momentum" SGD, or AdamW."""

from __future__ import annotations

import torch
from torch import nn

from asg.config import OptimConfig


class LRInMomentumSGD(torch.optim.Optimizer):
    """SGD whose momentum buffer accumulates ``lr * (g + wd * p)`` (the official VisDA variant).

    ``buf = lr*d`` on the first step, else ``buf = momentum*buf + lr*d``; then ``p -= buf``. A learning-rate
    change therefore does not rescale past velocity, and a group at lr 0 still drifts with its momentum.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                state = self.state[p]
                if "momentum_buffer" not in state:
                    buf = state["momentum_buffer"] = d.mul_(lr)
                else:
                    buf = state["momentum_buffer"].mul_(mom).add_(d, alpha=lr)
                p.sub_(buf)


def build_optimizer(groups: list[tuple[str, list[nn.Parameter]]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """One param group per layer group; the last group (the new head) gets ``lr``, the others ``lr * mult``.

    Each param group stores its ``base_lr`` and ``name``; the loop sets ``lr = base_lr * schedule * scale``.
    """
    param_groups = []
    for i, (name, params) in enumerate(groups):
        is_head = i == len(groups) - 1
        base = cfg.lr if is_head else cfg.lr * cfg.backbone_lr_mult
        param_groups.append(
            {"params": [p for p in params if p.requires_grad], "lr": base, "base_lr": base, "name": name}
        )
    if cfg.optimizer == "adamw":  # decoupled weight decay; momentum is beta1
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    if cfg.sgd == "lr_in_momentum":
        return LRInMomentumSGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
