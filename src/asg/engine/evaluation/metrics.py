"""One model's result on one set (:class:`EvalResult`: a confusion matrix and the task whose metrics it gives;
the metrics themselves are the task's, ``asg.tasks``). Their average over the real sets is
:class:`asg.engine.rundir.summary.EvalReport`'s."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from asg.tasks import CLASSIFICATION, get_task


@dataclass
class EvalResult:
    """Metrics of one model on one set from one confusion matrix (``confusion[i, j]``: true i predicted as j),
    as the task ``task`` (its name) computes them. ``primary`` is the task's headline number. ``class_groups``
    (``DataBundle.class_groups``) adds ``group_means``: the mean per-class metric of each named group of classes."""

    confusion: np.ndarray  # [C, C] int64
    task: str = CLASSIFICATION.name
    class_groups: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def primary(self) -> float:
        return float(self.to_dict()[get_task(self.task).primary_metric])

    def to_dict(self) -> dict:
        task = get_task(self.task)
        metrics = task.metrics(self.confusion)
        if self.class_groups:
            metrics["group_means"] = task.group_means(metrics, self.class_groups)
        return metrics
