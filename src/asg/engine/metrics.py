"""Metrics from one confusion matrix: accuracy and mean per-class accuracy (the VisDA metric) for classification,
IoU and mIoU for segmentation (:class:`EvalResult`), the confusion matrix itself with an ignore label, each task's
headline metric, and the average of a metric over the real sets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

# each task's headline metric: model selection (source-val, oracle) and the report use it
PRIMARY_METRIC = {"classification": "mean_class_acc", "segmentation": "miou"}


@dataclass
class EvalResult:
    """Metrics of one model on one set from one confusion matrix (``confusion[i, j]``: true i predicted as j).

    Classification reports accuracy and mean per-class accuracy (the VisDA-17 metric); segmentation reports
    pixel accuracy, per-class IoU and mIoU (Cityscapes protocol: over the classes present in the labels or the
    predictions). ``primary`` is the task's headline number (:data:`PRIMARY_METRIC`).
    """

    confusion: np.ndarray  # [C, C] int64
    task: str = "classification"

    @property
    def acc(self) -> float:
        """Overall (pixel) accuracy."""
        return float(np.trace(self.confusion) / max(self.confusion.sum(), 1))

    @property
    def per_class(self) -> list[float | None]:
        """Recall per class; None for a class with no samples in the set."""
        totals = self.confusion.sum(axis=1)
        return [float(self.confusion[i, i] / t) if t else None for i, t in enumerate(totals)]

    @property
    def mean_class_acc(self) -> float:
        """Mean of per-class accuracies over the classes present in the set (VisDA-17 protocol)."""
        present = [a for a in self.per_class if a is not None]
        return float(np.mean(present)) if present else 0.0

    @property
    def per_class_iou(self) -> list[float | None]:
        """IoU per class, ``tp / (tp + fp + fn)``; None for a class absent from labels and predictions."""
        tp = np.diag(self.confusion)
        union = self.confusion.sum(axis=0) + self.confusion.sum(axis=1) - tp
        return [float(t / u) if u else None for t, u in zip(tp, union)]

    @property
    def miou(self) -> float:
        present = [v for v in self.per_class_iou if v is not None]
        return float(np.mean(present)) if present else 0.0

    @property
    def primary(self) -> float:
        return float(getattr(self, PRIMARY_METRIC[self.task]))

    def to_dict(self) -> dict:
        if self.task == "segmentation":
            return {"pixel_acc": self.acc, "miou": self.miou, "per_class_iou": self.per_class_iou}
        return {"acc": self.acc, "mean_class_acc": self.mean_class_acc, "per_class": self.per_class}


def confusion_matrix(labels: Tensor, preds: Tensor, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """labels, preds: int tensors of one shape ([N] or [N, H, W]) -> [C, C] counts.

    Positions whose label is ``ignore_index`` (segmentation: 255) are left out, as mmseg's ``intersect_and_union``.
    """
    labels, preds = labels.reshape(-1).long(), preds.reshape(-1).long()
    if ignore_index is not None:
        keep = labels != ignore_index
        labels, preds = labels[keep], preds[keep]
    idx = labels * num_classes + preds
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def real_average(metrics: dict[str, dict[str, Any]], real_sets: list[str], metric: str) -> dict[str, Any] | None:
    """Mean of ``metric`` over the real sets present (at least two), labelled with what it averages.

    ``metrics`` maps set names to ``EvalResult.to_dict()``; returns e.g.
    ``{"metric": "miou", "value": 0.41, "over": ["cityscapes", "bdd100k", "mapillary"], ...}``.
    """
    names = [n for n in real_sets if n in metrics]
    if len(names) < 2:
        return None
    values = [metrics[n][metric] for n in names]
    return {"metric": metric, "value": float(np.mean(values)), "over": names, "note": "unweighted mean over the sets"}
