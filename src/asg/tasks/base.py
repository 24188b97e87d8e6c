"""The ``Task`` interface: what a task is asked by evaluation, the reports, the demo, model selection, init
compatibility and pseudo-labelling, and the metrics of a confusion matrix that the tasks share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from asg.config import Config, DataConfig
from asg.data.segmentation.pairs import PairTransform
from asg.methods import cross_entropy


@dataclass(frozen=True)
class Task:
    """A task's facts and behaviour. ``primary_metric`` (a key of :meth:`metrics`) is its headline number, with its
    ``label`` in tables and its ``description`` in prose; ``per_class`` is the per-class key and ``per_class_label``
    what it measures; ``overall`` the overall-accuracy key and its label; ``unit`` what is labelled (images, pixels);
    ``per_pixel``: one label per pixel (label maps, sliding windows, [B, C, H, W] logits) rather than per image;
    ``model_keys``: the ``model.*`` settings another run's weights must share to be loaded (``model.init_from``)."""

    name: str
    primary_metric: str
    label: str
    description: str
    per_class: str
    per_class_label: str
    overall: str
    overall_label: str
    unit: str
    per_pixel: bool
    model_keys: tuple[str, ...]

    def metrics(self, confusion: np.ndarray) -> dict[str, Any]:
        """The metrics of one confusion matrix (``confusion[i, j]``: true i predicted as j), as result files hold
        them: ``overall``, ``primary_metric`` and ``per_class``."""
        raise NotImplementedError

    def group_means(self, metrics: dict[str, Any], groups: dict[str, tuple[int, ...]]) -> dict[str, float | None]:
        """``{group: mean of metrics[per_class] over the group's classes present}`` (None when none is), e.g. the
        digit scenes' ``{"digit": 0.41, "background": 0.97}`` (mean IoU of the digit classes, of the background)."""
        per_class = metrics[self.per_class]
        out: dict[str, float | None] = {}
        for group, classes in groups.items():
            present = [per_class[c] for c in classes if per_class[c] is not None]
            out[group] = float(np.mean(present)) if present else None
        return out

    def eval_collate(self, batch: list) -> Any:
        """The ``collate_fn`` of an evaluation DataLoader."""
        raise NotImplementedError

    def batch_confusion(
        self,
        model: nn.Module,
        batch: Any,
        num_classes: int,
        prepare: Callable[[Tensor], Tensor],
        *,
        tta_flip: bool,
        window: tuple[int, int] | None,
        stride: tuple[int, int] | None,
        ignore_index: int,
    ) -> np.ndarray:
        """[C, C] counts of ``model``'s predictions on one evaluation batch (``prepare`` moves images to the
        device and layout)."""
        raise NotImplementedError

    def protocol(self, cfg: Config, num_classes: int) -> dict[str, Any]:
        """Fields of the evaluation protocol beyond the common ones (TTA, cap, BN mode, processes)."""
        return {}

    def inference_fields(self, cfg: Config, palette: list[list[int]]) -> dict[str, Any]:
        """Fields of a model's ``model.json`` beyond the common ones (``asg.engine.rundir.model_info.ModelInfo``);
        ``palette``: an RGB colour per class."""
        return {}

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean task loss of ``logits`` against ``labels`` (as the training loss computes it)."""
        return cross_entropy(logits, labels)

    def target_pair_transform(self, cfg: DataConfig) -> PairTransform | None:
        """The random transform of a pseudo-labelled target pair (image and label map alike), or None."""
        return None


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


def overall_accuracy(confusion: np.ndarray) -> float:
    """Overall (pixel) accuracy."""
    return float(np.trace(confusion) / max(confusion.sum(), 1))


def per_class_recall(confusion: np.ndarray) -> list[float | None]:
    """Recall per class; None for a class with no samples in the set."""
    totals = confusion.sum(axis=1)
    return [float(confusion[i, i] / t) if t else None for i, t in enumerate(totals)]


def per_class_iou(confusion: np.ndarray) -> list[float | None]:
    """IoU per class, ``tp / (tp + fp + fn)``; None for a class absent from labels and predictions."""
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    return [float(t / u) if u else None for t, u in zip(tp, union)]


def mean_of_present(values: list[float | None]) -> float:
    """Mean over the classes present (not None); 0 when none is."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else 0.0
