"""ASG's classification network: backbone + new task head + frozen guidance head, and the teacher."""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import Tensor, nn

from asg.errors import ConfigError
from asg.models.base import ASGNetwork, Backbone, ModelOutput, ParamGroups

__all__ = ["ASGClassifier", "ModelOutput", "Teacher", "make_teacher"]


class ASGClassifier(ASGNetwork):
    """Backbone -> pooled features [B, D] -> ``head`` (D -> hidden -> ReLU -> C, ASG's ``fc_new``, default init;
    ``hidden_dim=0``: one linear layer D -> C).

    The features are pooled once (``backbone(x)``: ``forward_features`` then ``forward_head(pre_logits=True)``).
    The backbone's guidance head (``imagenet_head``) is frozen, never in ``layer_groups``, and applied to the same
    pooled features to give the student's ImageNet logits for the proxy-guidance KL.
    """

    def __init__(self, backbone: Backbone, num_classes: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.backbone = backbone
        self._freeze_guidance_head()
        if hidden_dim == 0:  # a linear head (linear probing)
            self.head = nn.Sequential(nn.Linear(backbone.feature_dim, num_classes))
        else:
            self.head = nn.Sequential(
                nn.Linear(backbone.feature_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_classes)
            )
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> ModelOutput:
        """x [B,3,H,W] RGB in [0,1] -> ModelOutput."""
        features = self.backbone(x)  # pooled once; both heads read it
        return ModelOutput(self.head(features), self.imagenet_head(features), features)

    def forward_with_stages(self, x: Tensor) -> tuple[ModelOutput, list[Tensor]]:
        """``forward(x)`` and, from the same pass, the backbone's stage maps (``Backbone.forward_stages``), for a
        method that reads intermediate features (CSG)."""
        stages, features = self.backbone.forward_dense(self.backbone.normalize(x))
        return ModelOutput(self.head(features), self.imagenet_head(features), features), stages

    def layer_groups(self) -> ParamGroups:
        """The backbone's 6 groups (stem to last stage) + ``("head", ...)``; trainable parameters only."""
        head = [p for p in self.head.parameters() if p.requires_grad]
        return self.backbone.layer_groups() + [("head", head)]

    @property
    def last_layer_weight(self) -> Tensor:
        """[C, hidden] weight of the head's last Linear (source of the L2O observation's fc statistics)."""
        return cast(nn.Linear, cast(nn.Sequential, self.head)[-1]).weight

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trainable backbone parameters (the pretrained ones), in group order."""
        return [p for _, params in self.backbone.layer_groups() for p in params]

    def task_parameters(self) -> list[nn.Parameter]:
        """Parameters of the new task head."""
        return list(self.head.parameters())


TEACHER_OUTPUTS = ("logits", "features")


class Teacher(nn.Module):
    """Frozen ImageNet network: ``forward(x [B,3,H,W] in [0,1]) -> [B, 1000]`` logits, without autograd.

    ``output`` says what ``forward`` returns: "logits" (default, the ImageNet logits [B, 1000]) or "features"
    (the pooled deepest backbone features [B, D], the ImageNet head unused; feature guidance). The trainer sets it
    from the method's ``teacher_output``; ``imagenet_logits`` and ``features`` give either one whatever it is.

    A deep copy of ``backbone`` (weights and ImageNet head) re-strided to output stride 32: the ImageNet network
    as it was trained. A dilated ResNet student (output stride 16/8, segmentation) thus gets an undilated teacher
    with the same weights, whose logits differ from the student's initial ``imagenet_logits`` (the dilated
    network computes other features), so its KL does not start at 0. Every other backbone is copied as is (VGG16
    keeps FCN-8s's padding 100, as the official teacher). All parameters have ``requires_grad=False`` and the
    module stays in eval mode whatever ``train()`` is called.
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.backbone.set_output_stride(getattr(backbone, "native_output_stride", 32))
        for p in self.backbone.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.output = "logits"
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """x [B,3,H,W] in [0,1] -> pooled deepest features [B, D]."""
        return self.backbone(x)

    @torch.no_grad()
    def imagenet_logits(self, x: Tensor) -> Tensor:
        """x [B,3,H,W] in [0,1] -> ImageNet logits [B, 1000] of the pooled deepest features."""
        return self.backbone.imagenet_head(self.backbone(x))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """x [B,3,H,W] in [0,1] -> ImageNet logits [B, 1000] or, with ``output="features"``, features [B, D]."""
        if self.output == "features":
            return self.features(x)
        return self.imagenet_logits(x)

    def set_output(self, output: str) -> None:
        """What ``forward`` returns from now on: "logits" or "features" (ConfigError otherwise)."""
        if output not in TEACHER_OUTPUTS:
            raise ConfigError(f"teacher output {output!r}: choose one of {', '.join(TEACHER_OUTPUTS)}")
        self.output = output

    def with_output(self, output: str) -> Teacher:
        """This teacher answering ``output`` ("logits" or "features"): itself, or a view sharing its modules and
        weights (nothing is copied but the attribute)."""
        if output == self.output:
            return self
        view = copy.copy(self)  # a shallow copy shares the submodules; only ``output`` differs
        view.set_output(output)
        return view


def make_teacher(model: ASGNetwork) -> Teacher:
    """Deep copy of ``model``'s backbone + ImageNet head as it is now, at output stride 32 (see ``Teacher``).

    Call it before training (pretrained state).
    """
    return Teacher(model.backbone)
