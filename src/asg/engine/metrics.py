"""One model's result on one set (:class:`EvalResult`: a confusion matrix and the task whose metrics it gives;
the metrics themselves are the task's, ``asg.tasks``), and the average of a metric over the real sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def real_average(metrics: dict[str, dict[str, Any]], real_sets: list[str], metric: str) -> dict[str, Any] | None:
    """Mean of ``metric`` over the real sets present (at least two), labelled with what it averages.

    ``metrics`` maps set names to ``EvalResult.to_dict()``; returns e.g.
    ``{"metric": metric, "value": 0.41, "over": ["cityscapes", "bdd100k", "mapillary"], ...}``.
    """
    names = [n for n in real_sets if n in metrics]
    if len(names) < 2:
        return None
    values = [metrics[n][metric] for n in names]
    return {"metric": metric, "value": float(np.mean(values)), "over": names, "note": "unweighted mean over the sets"}
