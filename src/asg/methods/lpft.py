"""LP-FT baseline (Kumar et al., ICLR 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution"): linear probing, then full fine-tuning.

Steps ``0 .. probe_steps - 1`` train the new task head alone: every pretrained (ImageNet-initialised) parameter
that was trainable at set-up gets ``requires_grad=False``, so its gradient stays None, the optimizer leaves it
untouched (no momentum, no weight decay) and backward does not run through the backbone. From step
``probe_steps`` on everything that was trainable at set-up trains, with the run's per-group rates and schedule.
The loss is cross-entropy throughout (as ERM).

Reconstruction choices: the probe is counted in optimizer steps of the same run (one optimizer, one schedule,
the head's own rate) rather than the paper's separately tuned logistic-regression probe; the "head" is the whole
new head (ASG's two-layer ``fc_new`` for classification, the dense head for segmentation), not a single linear
layer. The frozen ImageNet head never trains. The frozen/trainable state is derived from the step at every step
(:meth:`LPFT.begin_step`), so a resumed run is exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from torch import Tensor, nn

from asg.methods.base import LossOutput, MethodBase, cross_entropy
from asg.methods.space import Knob

if TYPE_CHECKING:
    from asg.models import ASGNetwork


class LPFT(MethodBase):
    """Cross-entropy with the pretrained parameters frozen for the first ``method.probe_steps`` steps."""

    knobs = (Knob("method.probe_steps", 10, 600, (25, 50, 100), integer=True, max_fraction=0.5),)

    def setup(self, model: nn.Module) -> None:
        pretrained = cast("ASGNetwork", model).pretrained_parameters()
        self.params: list[nn.Parameter] = [p for p in pretrained if p.requires_grad]

    def probing(self, step: int) -> bool:
        """Whether ``step`` (steps already taken) belongs to the linear-probe stage."""
        return step < self.cfg.probe_steps

    def begin_step(self, model: nn.Module, step: int) -> None:
        trainable = not self.probing(step)
        for p in self.params:
            p.requires_grad_(trainable)
            if not trainable:
                p.grad = None

    def loss(self, out, labels: Tensor, teacher_logits: Tensor | None) -> LossOutput:
        task = cross_entropy(out.logits, labels)
        return LossOutput(task, {"task_loss": task.detach()})
