"""Feature guidance: proxy guidance for a backbone without an ImageNet head.

Loss = CE + beta * d(f_student, f_teacher), with f the pooled deepest backbone features [B, D]: the student's
``ModelOutput.features`` and the frozen ImageNet teacher's ``teacher.backbone(x)`` (its ImageNet head unused) on
the same synthetic batch. ASG's KL needs the ImageNet classifier on top of the features; this term only needs the
backbone, so it applies to any pretrained network (e.g. a self-supervised one). It is a feature-distillation
reconstruction for comparison, not part of the ASG paper.

``method.feature_distance`` (d):

- ``cosine`` (default): ``1 - cos(f_s, f_t)`` per image, mean over the batch. Scale-free and bounded in [0, 2]
  (0 parallel, 1 orthogonal, 2 opposite), so one weight grid carries across backbones whose feature norms
  differ by orders of magnitude, and it constrains the direction of the features, which is what a linear head
  reads.
- ``mse``: mean squared difference per feature dimension, ``mean((f_s - f_t)^2)`` over the batch and the D
  dimensions; its scale follows the backbone's feature norms.

The trainer hands the teacher's features in ``Batch.teacher_logits`` (the field's historical name) because this
method sets ``teacher_output = "features"``.
"""

from __future__ import annotations

from torch import Tensor, nn

from asg.errors import ConfigError
from asg.methods.base import LossOutput, MethodBase, cross_entropy
from asg.methods.space import Knob

DISTANCES = ("cosine", "mse")


def feature_distance(student: Tensor, teacher: Tensor, kind: str = "cosine", eps: float = 1e-8) -> Tensor:
    """Mean distance between two batches of feature vectors [B, D] (computed in float32).

    ``cosine``: mean over the batch of ``1 - cos(f_s, f_t)``, in [0, 2]; a zero vector (norm below ``eps``)
    counts as orthogonal to everything (distance 1). ``mse``: mean of ``(f_s - f_t)^2`` over the batch and the
    D dimensions.
    """
    s, t = student.float(), teacher.float()
    if s.shape != t.shape or s.ndim != 2:
        raise ValueError(
            f"feature_distance needs two [B, D] tensors of one shape, got {tuple(s.shape)} and {tuple(t.shape)}"
        )
    if kind == "cosine":
        return (1.0 - nn.functional.cosine_similarity(s, t, dim=1, eps=eps)).mean()
    if kind == "mse":
        return (s - t).pow(2).mean()
    raise ValueError(f"unknown feature distance {kind!r}; choose one of {', '.join(DISTANCES)}")


class FeatureGuidance(MethodBase):
    """CE + ``method.feature_weight`` x ``feature_distance(student features, teacher features)``."""

    knobs = (Knob("method.feature_weight", 0.01, 100.0, (0.1, 1.0, 10.0)),)  # beta

    needs_teacher = True
    teacher_output = "features"

    def loss(self, out, labels: Tensor, teacher_logits: Tensor | None) -> LossOutput:
        if teacher_logits is None:
            raise ConfigError("method feature needs the teacher's features; the training loop did not provide them")
        task = cross_entropy(out.logits, labels)
        dist = feature_distance(out.features, teacher_logits, self.cfg.feature_distance)
        total = task + self.cfg.feature_weight * dist
        return LossOutput(total, {"task_loss": task.detach(), "feature_dist": dist.detach()})
