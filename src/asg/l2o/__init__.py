"""Learned layer-wise learning rates (docs/l2o.md): policy, decision windows, controllers, REINFORCE, meta-training.

``CONTROLLERS`` / ``build_controller`` give the training loop its ``LRController``; ``REWARDS`` holds the
pluggable meta-training rewards (a reconstruction: the official reward was never released).
"""

from __future__ import annotations

from asg.engine.control import FixedController, LRController, StepStats
from asg.l2o.controllers import (
    CONTROLLERS,
    L2OController,
    RandomController,
    RandomInitController,
    build_controller,
    controller_seed,
)
from asg.l2o.observation import WindowAccumulator, WindowSummary
from asg.l2o.policy import SCALES, LRPolicy, load_policy, save_policy
from asg.l2o.reinforce import Reinforce, discounted_returns
from asg.l2o.rewards import REWARDS, RewardContext, get_reward
from asg.l2o.windows import WindowSchedule, next_window, window_lengths

__all__ = [
    "CONTROLLERS",
    "REWARDS",
    "SCALES",
    "FixedController",
    "L2OController",
    "LRController",
    "LRPolicy",
    "RandomController",
    "RandomInitController",
    "Reinforce",
    "RewardContext",
    "StepStats",
    "WindowAccumulator",
    "WindowSchedule",
    "WindowSummary",
    "build_controller",
    "controller_seed",
    "discounted_returns",
    "get_reward",
    "load_policy",
    "next_window",
    "save_policy",
    "window_lengths",
]
