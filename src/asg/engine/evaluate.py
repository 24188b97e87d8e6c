"""Evaluation on one confusion matrix: accuracy and mean per-class accuracy (the VisDA metric) for
classification, IoU and mIoU for segmentation; an ignore label; flip TTA."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from asg.config import Config
from asg.utils import progress

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


def predict_scores(model: nn.Module, x: Tensor, tta_flip: bool) -> Tensor:
    """Class scores [B, C]. With ``tta_flip``: mean of sigmoid(logits) over the image and its mirror,
    as the official VisDA evaluation; without: the logits."""
    logits = model(x).logits.float()
    if not tta_flip:
        return logits
    flipped = model(torch.flip(x, dims=[3])).logits.float()
    return (torch.sigmoid(logits) + torch.sigmoid(flipped)) / 2


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    *,
    batch_size: int = 128,
    tta_flip: bool = False,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    desc: str = "eval",
    show_progress: bool = True,
    channels_last: bool = False,
) -> EvalResult:
    """Evaluate ``model`` (returns ``ModelOutput``) on ``dataset`` of (image [3,H,W], label)."""
    was_training = model.training
    model.eval()
    from asg.data import collate_skip_none

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_none)  # fmt: skip
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for batch in progress(loader, desc=desc, enabled=show_progress, leave=False):
        if batch is None:  # every image of the batch was skipped (data.on_bad_image=skip)
            continue
        x, y = batch
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        preds = predict_scores(model, x, tta_flip).argmax(dim=1).cpu()
        confusion += confusion_matrix(y, preds, num_classes)
    model.train(was_training)
    return EvalResult(confusion)


@torch.no_grad()
def imagenet_retention(model: nn.Module, teacher: nn.Module, photos: Tensor, batch_size: int = 16) -> dict[str, float]:
    """How much ImageNet knowledge the trained model kept, measured on real photos [N, 3, H, W] in [0, 1].

    Returns the top-1 agreement between the model's (frozen) ImageNet head and the teacher, and the mean
    KL(p_teacher || p_model) over the photos.
    """
    from asg.methods import kl_teacher_student

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    agree, kl_sum = 0, 0.0
    for i in range(0, len(photos), batch_size):
        x = photos[i : i + batch_size].to(device)
        student, target = model(x).imagenet_logits.float(), teacher(x).float()
        agree += int((student.argmax(1) == target.argmax(1)).sum())
        kl_sum += float(kl_teacher_student(target, student)) * len(x)
    model.train(was_training)
    return {"top1_agreement": agree / len(photos), "kl": kl_sum / len(photos)}


def evaluate_sets(
    model: nn.Module,
    sets: dict[str, Dataset],
    num_classes: int,
    cfg: Config,
    device: torch.device | str,
    *,
    tta_flip: bool | None = None,
    show_progress: bool = True,
) -> dict[str, EvalResult]:
    """Evaluate ``model`` on each named set with the protocol of ``cfg`` (batch size, workers, TTA, layout).

    The one evaluation path of the package: the trainer's curves and selections and ``asg evaluate`` both use it.
    ``tta_flip`` overrides ``cfg.eval.tta_flip`` when given.
    """
    return {
        name: evaluate(
            model,
            ds,
            num_classes,
            batch_size=cfg.data.eval_batch_size,
            tta_flip=cfg.eval.tta_flip if tta_flip is None else tta_flip,
            device=device,
            num_workers=cfg.data.num_workers,
            desc=f"eval {name}",
            show_progress=show_progress,
            channels_last=cfg.model.channels_last,
        )
        for name, ds in sets.items()
    }
