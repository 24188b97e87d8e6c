"""The learning-rate controller contract between the training loop and ``asg.l2o``, and the callback that applies it.

The loop sets ``lr_g(t) = base_lr_g * schedule(t) * scale_g`` for every layer group ``g``; a controller
only chooses the per-group ``scale_g``. It sees per-step statistics that the loop already computes and
nothing else: it never touches the model, the data or the method. On several processes (torchrun) every
rank calls the controller with the same batch-averaged statistics, and rank 0's scales are broadcast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from asg.engine.callbacks import Callback, Loop
from asg.errors import ConfigError

if TYPE_CHECKING:
    from asg.config import Config
    from asg.engine.step import StepOutput


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


ControllerFactory = Callable[["Config", "int | None"], LRController]


def fixed_only(cfg: Config, steps_per_epoch: int | None = None) -> LRController:
    """The trainer's default factory: the engine knows only the fixed controller; ``asg.l2o.build_controller``
    (passed by ``asg.train``, adaptation and meta-training) knows them all."""
    if cfg.l2o.controller != "fixed":
        raise ConfigError(
            f"l2o.controller={cfg.l2o.controller} is built by asg.l2o.build_controller: pass "
            "Trainer(..., controller_factory=asg.l2o.build_controller) (asg.train does)"
        )
    return FixedController()


class LRControl(Callback):
    """After every step: the step's statistics to the controller, and its new scales (rank 0's) to the trainer."""

    key = "controller"  # its state's key in the checkpoint

    def __init__(self, controller: LRController, steps_per_epoch: int) -> None:
        self.controller, self.steps_per_epoch = controller, steps_per_epoch

    def on_step_end(self, trainer: Loop, out: StepOutput) -> None:
        w = trainer.model.last_layer_weight.detach()
        stats = StepStats(
            step=trainer.step,
            total_steps=trainer.cfg.train.steps,
            task_loss=out.logs["task_loss"],
            kl=out.logs.get("kl", 0.0),
            last_weight_mean=float(w.mean()),
            last_weight_std=float(w.std()),
            steps_per_epoch=self.steps_per_epoch,
        )
        new = self.controller.after_step(stats)
        if new is not None:
            trainer.scales = list(new)
        if trainer.dist.world > 1:  # rank 0's controller decides (the others' decide alike, but must not drift)
            trainer.scales = trainer.dist.broadcast(torch.tensor(trainer.scales, dtype=torch.float64)).tolist()

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)
