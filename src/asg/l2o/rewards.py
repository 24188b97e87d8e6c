"""Rewards for L2O meta-training, one per finished decision window.

RECONSTRUCTION: the ASG release contains neither the meta-training loop nor the reward (docs/l2o.md, "Reconstructed").
These functions are this project's best guess, selected by ``l2o.reward``. Every reward uses synthetic data
only -- the training windows' losses or the held-out synthetic split (source-val) -- never real images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from asg.errors import ConfigError
from asg.l2o.observation import WindowSummary


@dataclass
class RewardContext:
    """What a reward may use besides the finished window: the previous window, lambda, the source-val probe."""

    previous: WindowSummary | None
    kl_weight: float
    probe: Callable[[], float] | None


RewardFn = Callable[[WindowSummary, RewardContext], float]


def neg_train_loss(window: WindowSummary, ctx: RewardContext) -> float:
    """-(mean task loss + lambda * mean KL) over the window (default; the "Loss.avg" of the run names)."""
    return -(window.task_loss + ctx.kl_weight * window.kl)


def neg_heldout_loss(window: WindowSummary, ctx: RewardContext) -> float:
    """-(task loss of the current model on the held-out synthetic split), via the probe bound by the trainer."""
    if ctx.probe is None:
        raise ConfigError(
            "l2o.reward=neg_heldout_loss needs a source-val probe; set data.source_val_fraction > 0 "
            "so the trainer can bind one"
        )
    return -float(ctx.probe())


def loss_decrease(window: WindowSummary, ctx: RewardContext) -> float:
    """Drop of (task loss + lambda * KL) from the previous window to this one (0 for the first window)."""
    if ctx.previous is None:
        return 0.0
    prev = ctx.previous.task_loss + ctx.kl_weight * ctx.previous.kl
    return prev - (window.task_loss + ctx.kl_weight * window.kl)


REWARDS: dict[str, RewardFn] = {
    "neg_train_loss": neg_train_loss,
    "neg_heldout_loss": neg_heldout_loss,
    "loss_decrease": loss_decrease,
}


def get_reward(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ConfigError(f"l2o.reward: unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    return REWARDS[name]
