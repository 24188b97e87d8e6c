"""ImageNet retention: how much of its ImageNet knowledge a trained model kept, measured against the frozen
teacher on real photos (top-1 agreement of the ImageNet heads and the KL between them)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from asg.methods.base import kl_teacher_student


@torch.no_grad()
def imagenet_retention(
    model: nn.Module, teacher: nn.Module | Tensor, photos: Tensor, batch_size: int = 16
) -> dict[str, float]:
    """How much ImageNet knowledge the trained model kept, measured on real photos [N, 3, H, W] in [0, 1].

    ``teacher``: the frozen ImageNet network, or its logits on ``photos`` [N, 1000] computed once before
    (:func:`teacher_photo_logits`; they do not change). Returns the top-1 agreement between the model's (frozen)
    ImageNet head and the teacher, and the mean KL(p_teacher || p_model) over the photos.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    agree, kl_sum = 0, 0.0
    for i in range(0, len(photos), batch_size):
        x = photos[i : i + batch_size].to(device)
        student = model(x).imagenet_logits.float()
        target = teacher[i : i + batch_size].to(device) if isinstance(teacher, Tensor) else teacher(x).float()
        agree += int((student.argmax(1) == target.argmax(1)).sum())
        kl_sum += float(kl_teacher_student(target, student)) * len(x)
    model.train(was_training)
    return {"top1_agreement": agree / len(photos), "kl": kl_sum / len(photos)}


@torch.no_grad()
def teacher_photo_logits(teacher: nn.Module, photos: Tensor, batch_size: int = 16) -> Tensor:
    """The teacher's ImageNet logits [N, 1000] (fp32, on the CPU) on ``photos`` [N, 3, H, W]."""
    device = next(teacher.parameters()).device
    return torch.cat(
        [teacher(photos[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(photos), batch_size)]
    )
