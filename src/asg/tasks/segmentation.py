"""Semantic segmentation: one label per pixel (255: ignored); pixel accuracy, per-class IoU and mIoU (Cityscapes
protocol: over the classes present in the labels or the predictions), at the labels' resolution."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from asg.config import Config, DataConfig
from asg.data.files import list_collate, same_size_groups
from asg.data.segmentation.pairs import PairTransform
from asg.methods import cross_entropy
from asg.models.inference import segmentation_probs
from asg.tasks.base import Task, confusion_matrix, mean_of_present, overall_accuracy, per_class_iou


@dataclass(frozen=True)
class SegmentationTask(Task):
    def metrics(self, confusion: np.ndarray) -> dict[str, Any]:
        iou = per_class_iou(confusion)
        return {
            self.overall: overall_accuracy(confusion),
            self.primary_metric: mean_of_present(iou),
            self.per_class: iou,
        }

    def eval_collate(self, batch: list) -> Any:
        """Samples stay a list: images and label maps may differ in size."""
        return list_collate(batch)

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
        """Targets [H, W] with ``ignore_index``; probabilities (whole image or sliding ``window``, optional flip) are
        bilinearly upsampled to each label's size before the argmax, so metrics are at label resolution."""
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        for group in same_size_groups(batch):
            x = prepare(torch.stack([img for img, _ in group]))
            probs = segmentation_probs(model, x, tta_flip=tta_flip, window=window, stride=stride)
            for p, (_, y) in zip(probs, group):
                if tuple(p.shape[1:]) != tuple(y.shape):
                    p = nn.functional.interpolate(p[None], size=tuple(y.shape), mode="bilinear", align_corners=False)[0]
                confusion += confusion_matrix(y, p.argmax(dim=0).cpu(), num_classes, ignore_index)
        return confusion

    def protocol(self, cfg: Config, num_classes: int) -> dict[str, Any]:
        return {
            "split": cfg.data.split,
            "class_set": num_classes,
            "eval_resize": cfg.data.eval_resize or "native",
            "sliding_window": cfg.eval.sliding_window or "whole image",
        }

    def inference_fields(self, cfg: Config, palette: list[list[int]]) -> dict[str, Any]:
        """The inference input size, sliding windows, the segmenter and the classes' colours."""
        return {
            "palette": palette,
            "eval_resize": list(cfg.data.eval_resize) if cfg.data.eval_resize else None,
            "sliding_window": list(cfg.eval.sliding_window) if cfg.eval.sliding_window else None,
            "sliding_stride": list(cfg.eval.sliding_stride) if cfg.eval.sliding_stride else None,
            "segmenter": cfg.model.segmenter,
        }

    def target_pair_transform(self, cfg: DataConfig) -> PairTransform | None:
        """The training pairs' resize, rescale, crop and flip, applied to the target image and its pseudo-labels."""
        return PairTransform(cfg.train_resize, cfg.scale_range, cfg.crop_size, cfg.flip)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Logits [B, C, h, w] are upsampled to the labels' [B, H, W] first (labels keep their size under
        ``data.eval_resize``; evaluation compares at label resolution too)."""
        if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
            size = tuple(labels.shape[-2:])
            logits = nn.functional.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        return cross_entropy(logits, labels)


SEGMENTATION = SegmentationTask(
    name="segmentation",
    primary_metric="miou",
    label="mIoU",
    description="mIoU",
    per_class="per_class_iou",
    per_class_label="IoU",
    overall="pixel_acc",
    overall_label="pixel acc",
    unit="pixels",
    per_pixel=True,
    model_keys=("backbone", "segmenter"),
)
