"""The method contract: a method turns one batch's model outputs into a loss, nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from asg.config import MethodConfig


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and detached scalars to log (``task_loss`` always, ``kl`` if computed)."""

    loss: Tensor
    logs: dict[str, Tensor]


class Method(Protocol):
    """Objective of one training method. ``needs_teacher`` asks the loop for the frozen teacher's logits."""

    needs_teacher: bool

    def setup(self, model: nn.Module) -> None:
        """Called once before training (e.g. L2-SP snapshots the pretrained weights)."""
        ...

    def loss(self, out, labels: Tensor, teacher_logits: Tensor | None) -> LossOutput:
        """``out`` is an ``asg.models.ModelOutput``; labels [B] (or [B, H, W] for segmentation, 255 = ignore);
        teacher_logits [B, 1000] or None (one ImageNet prediction per image for both tasks)."""
        ...


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy. Classification: logits [B, C], labels [B]. Segmentation: logits [B, C, H, W],
    labels [B, H, W] with ``IGNORE_INDEX`` (255) on unlabelled pixels, mean over the labelled pixels."""
    if logits.ndim > 2:
        from asg.data.bundle import IGNORE_INDEX

        return nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    return nn.functional.cross_entropy(logits.float(), labels)


def kl_teacher_student(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(p_teacher || p_student) at temperature 1, summed over classes, averaged over the batch.

    Both [B, K] logits. Equals ``KLDivLoss(reduction='batchmean')(log_softmax(student), softmax(teacher))``.
    """
    log_p_s = torch.log_softmax(student_logits.float(), dim=1)
    log_p_t = torch.log_softmax(teacher_logits.float(), dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


class MethodBase:
    """Default ``setup`` (nothing to do) for methods that need none."""

    needs_teacher = False

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg

    def setup(self, model: nn.Module) -> None:
        pass
