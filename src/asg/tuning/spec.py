"""What one study tunes and how: ``asg sweep``'s arguments, checked (:class:`SweepSpec`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from asg.errors import ConfigError

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("asha", "asha-async", "none")  # asha: in trial order (asg.tuning.asha); asha-async: Optuna's own


@dataclass
class SweepSpec:
    """What one study tunes and how (``asg sweep``'s arguments)."""

    recipe: str
    out: Path  # the sweep folder: optuna.journal, sweep.json, trials/NNNN run folders
    overrides: list[str] = field(default_factory=list)  # every trial's common overrides (length, data, seed)
    trials: int = 8  # the study's budget, over all workers
    sampler: str = "tpe"
    seed: int = 0
    pruner: str = "asha"
    min_resource: int | None = None  # ASHA's first rung in steps (None: train.eval_every)
    reduction_factor: int = 3
    storage: str | None = None  # None: the journal file in ``out``
    study_name: str | None = None  # None: the sweep folder's name
    ranges: dict[str, tuple[float, float, tuple[float, ...]]] = field(default_factory=dict)
    heartbeat_s: int = 60
    grace_s: int = 180
    max_retries: int = 2

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")
        if self.trials < 1:
            raise ConfigError(f"trials must be at least 1, not {self.trials}")

    @property
    def name(self) -> str:
        return self.study_name or self.out.resolve().name
