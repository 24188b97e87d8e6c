"""Checks that stop a run before it writes bad weights: finite weights and a loss-explosion guard."""

from __future__ import annotations

import math

import torch
from torch import nn

from asg.errors import TrainingDiverged


class LossGuard:
    """Flags a finite loss explosion: a loss above ``factor`` times the loss scale at the start of training.

    The scale is the smallest of the first ``warmup`` losses, and at least ``floor``. It is taken from the start
    rather than from a running average because a running average absorbs an explosion while it happens (a loss
    going 1 -> 45 -> 2e4 in three steps raises the average as fast as the loss); the smallest early loss does
    not move, and the floor keeps a model that starts near zero loss from flagging ordinary noise.
    Checking starts at the second step. ``factor=None`` turns the guard off (non-finite losses are still flagged).
    RECONSTRUCTION: ASG's code has no such guard; the rule and its defaults are this package's choice.
    """

    def __init__(self, factor: float | None, warmup: int = 10, floor: float = 1.0) -> None:
        self.factor, self.warmup, self.floor = factor, warmup, floor
        self.count, self.first_min = 0, math.inf

    @property
    def scale(self) -> float:
        return max(self.first_min, self.floor)

    def exploded(self, loss: float) -> bool:
        """True when ``loss`` is non-finite, or the guard is on and ``loss > factor * scale``."""
        if not math.isfinite(loss):
            return True
        return self.factor is not None and self.count > 0 and loss > self.factor * self.scale

    def update(self, loss: float) -> None:
        if self.count < self.warmup:
            self.first_min = min(self.first_min, loss)
        self.count += 1

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "first_min": self.first_min}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.first_min = int(state["count"]), float(state["first_min"])


def non_finite_tensors(module: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``module`` that hold NaN or inf."""
    return [k for k, v in module.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def diverged(what: str, values: dict[str, float], step: int, kept: str, detail: str = "") -> TrainingDiverged:
    """The error that stops a diverging run: what went wrong at ``step``, its values, and what is kept on disk."""
    return TrainingDiverged(
        f"{what} at step {step} ({', '.join(f'{k}={v:.4g}' for k, v in values.items())}){detail}; "
        f"training stopped and {kept}. Lower optim.lr or method.kl_weight, or set optim.max_grad_norm "
        "(a resume applies them: --resume --set optim.lr=...)"
    )
