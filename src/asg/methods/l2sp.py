"""L2-SP baseline (Li et al., 2018): CE + alpha/2 * ||w - w0||^2 over the pretrained (backbone) weights."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from asg.methods.base import LossOutput, MethodBase, cross_entropy
from asg.methods.space import Knob


class L2SP(MethodBase):
    knobs = (Knob("method.l2sp_alpha", 1e-4, 1.0, (0.001, 0.01, 0.1)),)

    def setup(self, model: nn.Module) -> None:
        backbone = cast(nn.Module, model.backbone)  # torch types Module.__getattr__ as Tensor | Module
        self.params = [p for p in backbone.parameters() if p.requires_grad]
        self.anchors = [p.detach().clone() for p in self.params]

    def loss(self, out, labels: Tensor, teacher_logits: Tensor | None) -> LossOutput:
        task = cross_entropy(out.logits, labels)
        dist = torch.stack([(p - a).pow(2).sum() for p, a in zip(self.params, self.anchors)]).sum()
        total = task + 0.5 * self.cfg.l2sp_alpha * dist
        return LossOutput(total, {"task_loss": task.detach(), "l2sp_dist": dist.detach()})
