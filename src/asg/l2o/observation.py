"""Window statistics -> the policy's observation vector (docs/l2o.md, "Faithful to the release")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from asg.engine.control import StepStats
from asg.errors import TrainingDiverged


@dataclass
class WindowSummary:
    """Means over one decision window and the latest head-weight statistics."""

    steps: int
    task_loss: float
    kl: float
    progress: float
    last_weight_mean: float
    last_weight_std: float
    end_step: int


class WindowAccumulator:
    """Sums ``StepStats`` of the current window; ``observation`` builds the [1, 5 + G] policy input."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sum_loss = self.sum_kl = self.sum_progress = 0.0
        self.last: StepStats | None = None

    def add(self, stats: StepStats) -> None:
        for name in ("task_loss", "kl", "last_weight_mean", "last_weight_std"):
            value = getattr(stats, name)
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"L2O observation: {name} is {value} at step {stats.step}; the task training diverged "
                    "(lower the learning rate or enable optim.max_grad_norm)"
                )
        self.n += 1
        self.sum_loss += stats.task_loss
        self.sum_kl += stats.kl
        self.sum_progress += stats.progress
        self.last = stats

    def summary(self) -> WindowSummary:
        if self.last is None:
            raise RuntimeError("no step was recorded in this window")
        n = self.n
        return WindowSummary(
            steps=n,
            task_loss=self.sum_loss / n,
            kl=self.sum_kl / n,
            progress=self.sum_progress / n,
            last_weight_mean=self.last.last_weight_mean,
            last_weight_std=self.last.last_weight_std,
            end_step=self.last.step,
        )

    def observation(self, scales: list[float]) -> Tensor:
        """[1, 5 + G]: mean task loss, mean (unweighted) KL, mean progress, weight mean, weight std, scales."""
        s = self.summary()
        values = [s.task_loss, s.kl, s.progress, s.last_weight_mean, s.last_weight_std, *scales]
        for name, v in zip(("task_loss", "kl", "progress", "last_weight_mean", "last_weight_std"), values):
            if not math.isfinite(v):
                raise TrainingDiverged(f"L2O observation: window mean of {name} is {v} at step {s.end_step}")
        return torch.tensor([values], dtype=torch.float32)
