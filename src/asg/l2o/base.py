"""The learning-rate controller contract between the training loop and ``asg.l2o``.

The loop sets ``lr_g(t) = base_lr_g * schedule(t) * scale_g`` for every layer group ``g``; a controller
only chooses the per-group ``scale_g``. It sees per-step statistics that the loop already computes and
nothing else: it never touches the model, the data or the method. On several processes (torchrun) every
rank calls the controller with the same batch-averaged statistics, and rank 0's scales are broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class StepStats:
    """What the loop reports after each optimizer step (scalars, already reduced over the batch)."""

    step: int  # optimizer steps done so far (1-based after the first step)
    total_steps: int
    task_loss: float
    kl: float  # unweighted KL(teacher || student); 0.0 for methods without a teacher
    last_weight_mean: float  # mean of the new head's last Linear weight
    last_weight_std: float
    steps_per_epoch: int  # for the released window rule

    @property
    def progress(self) -> float:
        return self.step / self.total_steps


class LRController(Protocol):
    """Chooses one learning-rate scale per layer group."""

    def start(self, group_names: list[str], total_steps: int) -> list[float]:
        """Scales used from step 0 (before any statistics exist)."""
        ...

    def after_step(self, stats: StepStats) -> list[float] | None:
        """Called after every optimizer step; returns new scales when a decision is taken, else None."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedController:
    """Scale 1 for every group all run: the hand-set layer-wise rates of the recipe."""

    def start(self, group_names: list[str], total_steps: int) -> list[float]:
        self.num_groups = len(group_names)
        return [1.0] * self.num_groups

    def after_step(self, stats: StepStats) -> list[float] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
