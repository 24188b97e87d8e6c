"""Plain fine-tuning on the synthetic data: cross-entropy only."""

from __future__ import annotations

from torch import Tensor

from asg.methods.base import LossOutput, MethodBase, cross_entropy


class ERM(MethodBase):
    def loss(self, out, labels: Tensor, teacher_logits: Tensor | None) -> LossOutput:
        task = cross_entropy(out.logits, labels)
        return LossOutput(task, {"task_loss": task.detach()})
