"""What differs between the tasks, in one place: metrics and their labels, the protocol fields, the held-out loss.

``task_of(data)`` gives the ``Task`` of a ``DataBundle`` (its ``task`` names it). Code outside models, data and
evaluation asks the task instead of branching on ``data.task == "segmentation"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from asg.config import Config, DataConfig
from asg.data import DataBundle
from asg.data.segmentation.pairs import PairTransform
from asg.engine.evaluate import list_collate, same_size_groups
from asg.errors import AsgError
from asg.methods import cross_entropy


@dataclass(frozen=True)
class Task:
    """A task's facts: ``primary_metric`` (key of ``EvalResult.to_dict``) and its ``label`` in reports, the
    per-class key and what it measures, the overall-accuracy key and its label, the ``unit`` a label belongs to."""

    name: str
    primary_metric: str
    label: str
    per_class: str
    per_class_label: str
    overall: str
    overall_label: str
    unit: str

    @property
    def is_segmentation(self) -> bool:
        return self.name == "segmentation"

    def protocol(self, cfg: Config, num_classes: int) -> dict[str, Any]:
        """Fields of the evaluation protocol beyond the common ones (TTA, cap, BN mode, processes)."""
        return {}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean task loss of ``logits`` against ``labels`` (as the training loss computes it)."""
        return cross_entropy(logits, labels)

    def target_pair_transform(self, cfg: DataConfig) -> PairTransform | None:
        """The random transform of a pseudo-labelled target pair (image and label map alike), or None."""
        return None


@dataclass(frozen=True)
class SegmentationTask(Task):
    def protocol(self, cfg: Config, num_classes: int) -> dict[str, Any]:
        return {
            "split": cfg.data.split,
            "class_set": num_classes,
            "eval_resize": cfg.data.eval_resize or "native",
            "sliding_window": cfg.eval.sliding_window or "whole image",
        }

    def target_pair_transform(self, cfg: DataConfig) -> PairTransform | None:
        """The training pairs' resize, rescale, crop and flip, applied to the target image and its pseudo-labels."""
        return PairTransform(cfg.train_resize, cfg.scale_range, cfg.crop_size, cfg.flip)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits [B, C, h, w] are upsampled to the labels' [B, H, W] first (labels keep their size under
        ``data.eval_resize``; evaluation compares at label resolution too)."""
        if tuple(logits.shape[-2:]) != tuple(labels.shape[-2:]):
            logits = nn.functional.interpolate(logits.float(), size=tuple(labels.shape[-2:]), mode="bilinear",
                                               align_corners=False)  # fmt: skip
        return cross_entropy(logits, labels)


CLASSIFICATION = Task("classification", "mean_class_acc", "mean-class acc", "per_class", "accuracy", "acc", "acc",
                      "images")  # fmt: skip
SEGMENTATION = SegmentationTask("segmentation", "miou", "mIoU", "per_class_iou", "IoU", "pixel_acc", "pixel acc",
                                "pixels")  # fmt: skip
TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, SEGMENTATION)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise AsgError(f"unknown task {name!r}: one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of(data: DataBundle) -> Task:
    return get_task(data.task)


def task_with_metric(metric: str) -> Task:
    """The task whose primary metric is ``metric`` (as result files name it)."""
    return next(t for t in TASKS.values() if t.primary_metric == metric)


@torch.no_grad()
def heldout_loss(model: nn.Module, data: DataBundle, cfg: Config, device: torch.device, max_batches: int = 4) -> float:
    """Mean task loss of ``model`` on the first ``max_batches`` batches of the held-out synthetic split."""
    name = data.source_val_name
    if name is None:
        raise AsgError("a held-out reward needs a source-val split (data.source_val_fraction > 0)")
    task, ds = task_of(data), data.eval_sets[name]
    loader: DataLoader[Dataset] = DataLoader(ds, batch_size=cfg.data.eval_batch_size, shuffle=False,
                                             collate_fn=list_collate)  # fmt: skip
    was_training, total, n = model.training, 0.0, 0
    model.eval()
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        for group in same_size_groups(batch):
            by_label: dict[tuple[int, ...], list[Any]] = {}  # native label sizes may differ under eval_resize
            for item in group:
                by_label.setdefault(tuple(torch.as_tensor(item[1]).shape), []).append(item)
            for items in by_label.values():
                x = torch.stack([item[0] for item in items]).to(device)
                y = torch.stack([torch.as_tensor(item[1]) for item in items]).to(device)
                total += float(task.loss(model(x).logits, y)) * len(items)
                n += len(items)
    model.train(was_training)
    return total / max(n, 1)
