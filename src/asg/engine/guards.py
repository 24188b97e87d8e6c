"""Checks that stop a run before it writes bad weights: finite weights and a loss-explosion guard."""

from __future__ import annotations

import math

import torch
from torch import nn


class LossGuard:
    """Flags a finite loss explosion: a loss above ``factor`` times the loss scale seen so far.

    The scale is the larger of the running mean of the loss (exponential, ``momentum``) and the mean of the first
    ``warmup`` losses, so a loss that has legitimately fallen near zero does not make ordinary noise look like an
    explosion. Nothing is flagged during the first ``warmup`` steps. ``factor=None`` turns the guard off.
    RECONSTRUCTION: ASG's code has no such guard; the rule and its defaults are this package's choice.
    """

    def __init__(self, factor: float | None, warmup: int = 10, momentum: float = 0.98) -> None:
        self.factor, self.warmup, self.momentum = factor, warmup, momentum
        self.count, self.first_sum, self.running = 0, 0.0, 0.0

    @property
    def scale(self) -> float:
        return max(self.running, self.first_sum / max(min(self.count, self.warmup), 1))

    def exploded(self, loss: float) -> bool:
        """True when ``loss`` is non-finite, or the guard is on, warmed up, and ``loss > factor * scale``."""
        if not math.isfinite(loss):
            return True
        return self.factor is not None and self.count >= self.warmup and loss > self.factor * self.scale

    def update(self, loss: float) -> None:
        if self.count < self.warmup:
            self.first_sum += loss
        self.running = loss if self.count == 0 else self.momentum * self.running + (1 - self.momentum) * loss
        self.count += 1

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "first_sum": self.first_sum, "running": self.running}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.first_sum, self.running = int(state["count"]), state["first_sum"], state["running"]


def non_finite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` that hold NaN or inf."""
    return [k for k, v in module.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
