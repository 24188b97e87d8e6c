"""A study's search space: the method's knobs (``asg.methods.space``) as Optuna suggestions and as overrides.

A trial's parameters become ``--set KEY=VALUE`` overrides written with ``repr``, so ``asg train --set ...`` with
the same strings rebuilds the same config, bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optuna

from asg.config import Config
from asg.errors import ConfigError
from asg.methods import METHODS
from asg.methods.space import COMMON_KNOBS, Knob


def method_knobs(cfg: Config, ranges: dict[str, tuple[float, float, tuple[float, ...]]] | None = None) -> list[Knob]:
    """The search space of ``cfg``'s method: the common knobs, then its own; ``ranges`` (key -> low, high, grid)
    narrows some of them (a benchmark's learning rates, say)."""
    if cfg.method.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {cfg.method.name!r}; choose one of {', '.join(METHODS)}")
    knobs = [*COMMON_KNOBS, *METHODS[cfg.method.name].knobs]
    unknown = set(ranges or {}) - {k.key for k in knobs}
    if unknown:
        raise ConfigError(f"no knob {sorted(unknown)[0]!r} in the search space of method {cfg.method.name!r}")
    knobs = [k.narrowed(*ranges[k.key]) if ranges and k.key in ranges else k for k in knobs]
    return [k.within(cfg.train.steps) for k in knobs]


def check_knob(knob: Knob, cfg: Config) -> None:
    """Refuse a knob whose key is not a numeric field of the config schema."""
    section, _, name = knob.key.partition(".")
    part = getattr(cfg, section, None)
    fields = {f.name: str(f.type) for f in dataclasses.fields(part)} if dataclasses.is_dataclass(part) else {}
    declared = fields.get(name, "").replace(" | None", "")
    if declared not in ("int", "float"):
        raise ConfigError(f"search space: {knob.key!r} is not a numeric field of the config")
    if knob.integer != (declared == "int"):
        kind = "an integer" if declared == "int" else "a float"
        raise ConfigError(f"search space: {knob.key!r} is {kind} field; its knob says integer={knob.integer}")


def suggest(trial: optuna.Trial, knobs: list[Knob]) -> dict[str, Any]:
    """One value per knob, named by its config key."""
    out: dict[str, Any] = {}
    for k in knobs:
        if k.integer:
            out[k.key] = trial.suggest_int(k.key, int(k.low), int(k.high), log=k.log)
        else:
            out[k.key] = trial.suggest_float(k.key, k.low, k.high, log=k.log)
    return out


def as_overrides(params: dict[str, Any]) -> list[str]:
    """``{"optim.lr": 0.01}`` -> ``["optim.lr=0.01"]`` (``repr``: a float reads back as the same float)."""
    return [f"{key}={value!r}" for key, value in params.items()]


def grid_space(knobs: list[Knob]) -> dict[str, list[Any]]:
    """The grid sampler's space: every knob's grid values."""
    return {k.key: [int(v) if k.integer else float(v) for v in k.grid] for k in knobs}


def grid_size(knobs: list[Knob]) -> int:
    n = 1
    for k in knobs:
        n *= len(k.grid)
    return n
