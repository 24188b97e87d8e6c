"""Self-training on pseudo-labelled target images (the training part of CBST/CRST; rounds in ``asg.adapt``).

Loss = the wrapped source method's loss on the labelled synthetic batch
     + ``target_weight`` x (cross-entropy on the batch's pseudo-labelled target images
                            + ``reg_weight`` x CRST model regulariser on their selected predictions).

CRST's model regularisers (Zou et al., ICCV 2019) push the target predictions away from over-confidence:
``mrkld`` = KL(uniform || p) = -mean_k log p_k (+ const), ``mrent`` = sum_k p_k log p_k (negative entropy).
CRST's label regulariser (soft pseudo-labels) is not implemented. With ``ema_decay`` the method keeps an
exponential moving average of the weights (updated after every optimizer step, saved with the checkpoint);
the adaptation rounds then pseudo-label with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from asg.config import AdaptConfig
from asg.data.bundle import IGNORE_INDEX
from asg.methods.base import Batch, LossOutput, Method, cross_entropy


def model_regularizer(logits: Tensor, selected: Tensor, kind: str) -> Tensor:
    """Mean CRST model regulariser over the selected predictions.

    logits [B, C] (mask [B]) or [B, C, H, W] (mask [B, H, W]); ``kind`` "mrkld" or "mrent"; 0 when none selected.
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    if kind == "mrkld":
        per_item = -log_p.mean(dim=1)
    elif kind == "mrent":
        per_item = (log_p.exp() * log_p).sum(dim=1)
    else:
        raise ValueError(f"unknown regulariser {kind!r}")
    if not bool(selected.any()):
        return per_item.sum() * 0.0
    return per_item[selected].mean()


class SelfTraining:
    """Wraps a source method (``erm``, ``asg``, ...) and adds the pseudo-labelled target loss."""

    def __init__(self, source: Method, adapt: AdaptConfig) -> None:
        self.source, self.adapt = source, adapt
        self.needs_teacher = source.needs_teacher
        self.teacher_output = source.teacher_output
        self.ema: dict[str, Tensor] | None = None

    def setup(self, model: nn.Module) -> None:
        self.source.setup(model)
        if self.adapt.ema_decay is not None:
            self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def begin_step(self, model: nn.Module, step: int) -> None:
        self.source.begin_step(model, step)

    def bind_teacher(self, teacher: nn.Module) -> None:
        self.source.bind_teacher(teacher)

    def extra_parameters(self) -> list[nn.Parameter]:
        return self.source.extra_parameters()

    def loss(self, out: Any, labels: Tensor, teacher_logits: Tensor | None) -> LossOutput:
        return self.source.loss(out, labels, teacher_logits)

    def forward_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        lo = self.source.forward_loss(model, batch)
        if batch.target is None:
            return lo
        logits = model(batch.target.x).logits
        pseudo = batch.target.pseudo
        selected = pseudo != IGNORE_INDEX
        if bool(selected.any()):
            target_loss = cross_entropy(logits, pseudo)
        else:  # a segmentation batch whose pixels were all left out this round
            target_loss = logits.sum() * 0.0
        total_target = target_loss
        logs = {**lo.logs, "target_loss": target_loss.detach(), "selected": selected.float().mean()}
        if self.adapt.regularizer != "none":
            reg = model_regularizer(logits, selected, self.adapt.regularizer)
            total_target = total_target + self.adapt.reg_weight * reg
            logs["regularizer"] = reg.detach()
        return LossOutput(lo.loss + self.adapt.target_weight * total_target, logs)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        self.source.after_step(model)
        if self.ema is None or self.adapt.ema_decay is None:
            return
        d = self.adapt.ema_decay
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.ema[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                self.ema[k].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"source": self.source.state_dict()}
        if self.ema is not None:
            state["ema"] = {k: v.cpu() for k, v in self.ema.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state.get("source", {}))
        if self.ema is not None and "ema" in state:
            for k, v in state["ema"].items():
                self.ema[k].copy_(v)
