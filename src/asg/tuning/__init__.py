"""Hyper-parameter sweeps on Optuna: one study per recipe (a benchmark's method), seeded samplers (grid, random,
TPE), ASHA pruning on the source-val score, a journal file or PostgreSQL as the storage, and local worker
processes, machines or ``torchrun`` groups as workers. See docs/sweeps.md.

Names load on first use, so that ``asg.tuning.cli`` (built with every ``asg`` command line) imports no Optuna.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "SweepSpec": "asg.tuning.spec",
    "Study": "asg.tuning.study",
    "run_worker": "asg.tuning.study",
    "run_workers": "asg.tuning.launch",
    "sweep": "asg.tuning.launch",
    "summary": "asg.tuning.results",
}


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'asg.tuning' has no attribute {name!r}")


__all__ = list(_NAMES)
