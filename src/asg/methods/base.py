"""The method contract: a method turns one training batch into a loss; the trainer does the rest.

The trainer keeps backward, gradient clipping, the optimizer step and the per-group learning rates (the L2O
controller depends on them). A method may run more than one forward pass (e.g. over an unlabelled target part
of the batch), keep state that goes into the checkpoint, and act after each optimizer step (e.g. an EMA update),
as Dassl's ``forward_backward(batch_x, batch_u)`` and DomainBed's ``update(minibatches, unlabeled)`` allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from asg.config import MethodConfig
from asg.data.bundle import IGNORE_INDEX
from asg.methods.space import Knob


@dataclass
class LossOutput:
    """A scalar loss to backpropagate and detached scalars to log (``task_loss`` always, ``kl`` if computed)."""

    loss: Tensor
    logs: dict[str, Tensor]


@dataclass
class TargetBatch:
    """The target-domain part of a batch: images x [B', 3, H, W] with pseudo-labels [B'] (or [B', H, W], 255 =
    not selected) made by the adaptation round, never real target labels; idx [B'] their target-set indices."""

    x: Tensor
    pseudo: Tensor
    idx: Tensor


@dataclass
class Batch:
    """One step's data on the device: source images x [B, 3, H, W], labels y [B] (or [B, H, W], 255 = ignore),
    dataset indices idx [B], the frozen teacher's output when the method asked for it (``needs_teacher``), and
    an optional target part (adaptation).

    ``teacher_logits`` holds what the method's ``teacher_output`` names: the teacher's ImageNet logits [B, 1000]
    ("logits", ASG), or its pooled deepest backbone features [B, D] ("features", feature guidance). The field keeps
    its historical name for both."""

    x: Tensor
    y: Tensor
    idx: Tensor
    teacher_logits: Tensor | None = None
    target: TargetBatch | None = None


class Method(Protocol):
    """Objective of one training method. ``needs_teacher`` asks the loop for the frozen teacher's output, and
    ``teacher_output`` says which: "logits" (ImageNet logits [B, 1000]) or "features" (pooled features [B, D])."""

    needs_teacher: bool
    teacher_output: str

    def setup(self, model: nn.Module) -> None:
        """Called once before training, on the starting weights (e.g. L2-SP snapshots them)."""
        ...

    def begin_step(self, model: nn.Module, step: int) -> None:
        """Called before the forward pass of every optimizer step, with the number of steps already taken (0 for
        the first; after a resume the restored step). A method that changes what trains over time (LP-FT) derives
        its state from ``step`` here, so that a resumed run is exact."""
        ...

    def forward_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Run the model on ``batch`` (as many forward passes as the method needs) and return the loss."""
        ...

    def loss(self, out: Any, labels: Tensor, teacher_logits: Tensor | None) -> LossOutput:
        """The loss of one labelled forward pass: ``out`` an ``asg.models.ModelOutput``; labels [B] (or [B, H, W],
        255 = ignore); teacher_logits [B, 1000] or None (one ImageNet prediction per image for both tasks), or
        the teacher's features [B, D] for a method whose ``teacher_output`` is "features"."""
        ...

    def after_step(self, model: nn.Module) -> None:
        """Called once after every optimizer step (e.g. an EMA of the weights)."""
        ...

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Called once before ``setup`` with the trainer's frozen ImageNet teacher (``asg.models.Teacher``), for a
        method that runs it itself (CSG's key encoder); most methods ignore it."""
        ...

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters the method owns (CSG's projection MLPs), after ``setup``: the optimizer trains them
        in the new head's group; the method saves them in its ``state_dict``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers saved with the checkpoint (``{}`` for stateless methods)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy. Classification: logits [B, C], labels [B]. Segmentation: logits [B, C, H, W],
    labels [B, H, W] with ``IGNORE_INDEX`` (255) on unlabelled pixels, mean over the labelled pixels."""
    if logits.ndim > 2:
        return nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    return nn.functional.cross_entropy(logits.float(), labels)


def kl_teacher_student(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(p_teacher || p_student) at temperature 1, summed over classes, averaged over the batch.

    Both [B, K] logits. Equals ``KLDivLoss(reduction='batchmean')(log_softmax(student), softmax(teacher))``.
    """
    log_p_s = torch.log_softmax(student_logits.float(), dim=1)
    log_p_t = torch.log_softmax(teacher_logits.float(), dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def with_method_parameters(groups: list[tuple[str, list[nn.Parameter]]], method: Any) -> list[tuple[str, list[Any]]]:
    """The model's layer groups with the method's own trainable parameters (``extra_parameters``) added to the
    last group, the new head's (same learning rate and L2O scale); ``groups`` itself when there are none."""
    extra = list(getattr(method, "extra_parameters", lambda: [])())
    if not extra:
        return groups
    name, params = groups[-1]
    return [*groups[:-1], (name, [*params, *extra])]


class MethodBase:
    """Defaults of the contract: one forward pass on the labelled batch, no state, nothing after the step.

    Subclasses of a one-pass method only define ``loss``.
    """

    needs_teacher = False
    teacher_output = "logits"
    knobs: tuple[Knob, ...] = ()  # the method's own search space, beside ``space.COMMON_KNOBS``

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg

    def setup(self, model: nn.Module) -> None:
        pass

    def begin_step(self, model: nn.Module, step: int) -> None:
        pass

    def loss(self, out: Any, labels: Tensor, teacher_logits: Tensor | None) -> LossOutput:
        raise NotImplementedError

    def forward_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        return self.loss(model(batch.x), batch.y, batch.teacher_logits)

    def after_step(self, model: nn.Module) -> None:
        pass

    def bind_teacher(self, teacher: nn.Module) -> None:
        pass

    def extra_parameters(self) -> list[nn.Parameter]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
