"""Search spaces, declared once next to each method (DomainBed's ``hparams_registry`` is the model).

A ``Knob`` is one config key with a range for random/TPE sampling and a few values for grid search. Every method
shares ``COMMON_KNOBS`` (the head's rate and the backbone's multiple of it: the backbone rate is a knob of every
method, L2O and random schedules included) and adds its own through ``Method.knobs``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Knob:
    """One tunable config key: sampled in [low, high] (log-uniform if ``log``), or from ``grid`` by grid search."""

    key: str  # dotted config key, e.g. "method.kl_weight"
    low: float
    high: float
    grid: tuple[float, ...]
    log: bool = True
    integer: bool = False
    max_fraction: float | None = None  # at most this fraction of ``train.steps`` (LP-FT's probe length)

    def __post_init__(self) -> None:
        if not self.low <= min(self.grid) <= max(self.grid) <= self.high:
            raise ValueError(f"knob {self.key}: grid {self.grid} outside [{self.low}, {self.high}]")

    def within(self, steps: int) -> Knob:
        """The knob for a run of ``steps`` steps (``max_fraction`` applied)."""
        if self.max_fraction is None or self.high <= self.max_fraction * steps:
            return self
        high = max(self.low, self.max_fraction * steps)
        grid = tuple(dict.fromkeys(min(v, high) for v in self.grid))
        return replace(self, high=high, grid=grid)

    def narrowed(self, low: float, high: float, grid: tuple[float, ...]) -> Knob:
        """The same knob over another range (a benchmark's learning rates, say)."""
        return replace(self, low=low, high=high, grid=grid)


LR = Knob("optim.lr", 1e-3, 0.3, (0.01, 0.03, 0.1))
BACKBONE_LR_MULT = Knob("optim.backbone_lr_mult", 0.03, 1.0, (0.03, 0.1, 0.3, 1.0))
COMMON_KNOBS: tuple[Knob, ...] = (LR, BACKBONE_LR_MULT)
