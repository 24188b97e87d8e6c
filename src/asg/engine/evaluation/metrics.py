"""One model's result on one set (:class:`EvalResult`: a confusion matrix and the task whose metrics it gives;
the metrics themselves are the task's, ``asg.tasks``). Their average over the real sets is
:class:`asg.engine.rundir.summary.EvalReport`'s."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asg.tasks import CLASSIFICATION, get_task


@dataclass
class EvalResult:
    """Metrics of one model on one set from one confusion matrix (``confusion[i, j]``: true i predicted as j),
    as the task ``task`` (its name) computes them. ``primary`` is the task's headline number."""

    confusion: np.ndarray  # [C, C] int64
    task: str = CLASSIFICATION.name

    @property
    def primary(self) -> float:
        return float(self.to_dict()[get_task(self.task).primary_metric])

    def to_dict(self) -> dict:
        return get_task(self.task).metrics(self.confusion)
