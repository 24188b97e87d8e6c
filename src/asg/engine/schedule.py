"""Learning-rate multipliers over training (``optim.schedule``, docs/recipes.md)."""

from __future__ import annotations

from collections.abc import Callable

from asg.config import OptimConfig


def warmup_poly_floor(t: int, total: int, warmup: int = 100, power: float = 0.9, floor_at: float = 0.8) -> float:
    """ASG's schedule: ``min(0.01 + 0.99 (t/warmup)^2, 1) * (1 - min(t/T, floor_at))^power``.

    Quadratic warm-up from 1% to 100% over ``warmup`` steps, poly decay, frozen from ``floor_at * T`` on.
    """
    warm = min(0.01 + 0.99 * (t / warmup) ** 2, 1.0) if warmup > 0 else 1.0
    return warm * (1.0 - min(t / total, floor_at)) ** power


def build_schedule(cfg: OptimConfig, total: int) -> Callable[[int], float]:
    """Multiplier ``f(t)`` for step ``t`` (0-based) of ``total``."""
    if cfg.schedule == "constant":
        return lambda t: 1.0
    floor = cfg.floor_at if cfg.schedule == "warmup_poly_floor" else 1.0  # CSG's variant has no floor
    return lambda t: warmup_poly_floor(t, total, cfg.warmup_steps, cfg.poly_power, floor)
