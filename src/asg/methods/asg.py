"""ASG proxy guidance: CE + lambda * KL(teacher || student) over the 1000 ImageNet classes.

The student's ImageNet logits come from the frozen ImageNet head on the trained features; the teacher is a
frozen ImageNet copy seeing the same synthetic batch. Temperature 1, batch-mean, no ImageNet images.
"""

from __future__ import annotations

from torch import Tensor, nn

from asg.collectives import global_mean
from asg.errors import ConfigError
from asg.methods.base import LossOutput, MethodBase, cross_entropy, kl_teacher_student
from asg.methods.space import Knob
from asg.models.base import NoGuidanceHead


class ASG(MethodBase):
    knobs = (Knob("method.kl_weight", 1e-3, 10.0, (0.01, 0.1, 1.0)),)  # lambda
    needs_teacher = True

    def setup(self, model: nn.Module) -> None:
        if isinstance(getattr(model, "imagenet_head", None), NoGuidanceHead):  # its KL would be 0: no guidance
            raise ConfigError(
                "method asg needs a guidance head, and model.guidance_head=none gives the backbone "
                "none: choose imagenet, dinov2_linear or clip_zeroshot, or use feature guidance "
                "(method.name=feature)"
            )

    def loss(self, out, labels: Tensor, teacher_logits: Tensor | None) -> LossOutput:
        if teacher_logits is None:
            raise ConfigError("method asg needs the teacher's logits; the training loop did not provide them")
        task = cross_entropy(out.logits, labels)
        kl = kl_teacher_student(teacher_logits, out.imagenet_logits)
        weight = self.cfg.kl_weight
        if self.cfg.kl_cap is not None:
            mean_kl = global_mean(kl.detach(), labels.shape[0])  # several processes: decide on the global batch
            if float(weight * mean_kl) > self.cfg.kl_cap:
                weight = self.cfg.kl_cap / float(mean_kl)  # lambda_eff * KL <= cap, as the official GTA5 L2O script
        total = task + weight * kl
        return LossOutput(total, {"task_loss": task.detach(), "kl": kl.detach()})
