"""Classification: one label per image; accuracy and mean per-class accuracy (the VisDA-17 metric)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from asg.data.files import collate_skip_none
from asg.models.inference import predict_scores
from asg.tasks.base import Task, confusion_matrix, mean_of_present, overall_accuracy, per_class_recall


@dataclass(frozen=True)
class ClassificationTask(Task):
    def metrics(self, confusion: np.ndarray) -> dict[str, Any]:
        """Accuracy, mean per-class accuracy over the classes present in the set (VisDA-17 protocol), per-class
        recall (None for a class with no samples)."""
        recall = per_class_recall(confusion)
        return {
            self.overall: overall_accuracy(confusion),
            self.primary_metric: mean_of_present(recall),
            self.per_class: recall,
        }

    def eval_collate(self, batch: list) -> Any:
        return collate_skip_none(batch)

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
        """Targets are int labels; flip TTA averages sigmoids (the official VisDA protocol)."""
        x, y = batch
        preds = predict_scores(model, prepare(x), tta_flip).argmax(dim=1).cpu()
        return confusion_matrix(y, preds, num_classes)


CLASSIFICATION = ClassificationTask(
    name="classification",
    primary_metric="mean_class_acc",
    label="mean-class acc",
    description="mean per-class accuracy",
    per_class="per_class",
    per_class_label="accuracy",
    overall="acc",
    overall_label="acc",
    unit="images",
    per_pixel=False,
    model_keys=("backbone", "hidden_dim"),
)
