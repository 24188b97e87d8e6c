"""ASG's classification network (spec 2.1): backbone + new task head + frozen ImageNet head, and the teacher."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from asg.config import ModelConfig
from asg.models.backbones import Backbone, ParamGroups, build_backbone


@dataclass
class ModelOutput:
    logits: Tensor  # [B, C] task logits from the new head
    imagenet_logits: Tensor  # [B, 1000] frozen ImageNet head on the trained features
    features: Tensor  # [B, D] pooled backbone features


class ASGClassifier(nn.Module):
    """Backbone -> pooled features [B, D] -> ``head`` (D -> hidden -> ReLU -> C, ASG's ``fc_new``, default init).

    The features are pooled once (``backbone(x)``: ``forward_features`` then ``forward_head(pre_logits=True)``).
    The backbone's ImageNet head (``imagenet_head``) is frozen, never in ``layer_groups``, and applied to the same
    pooled features to give the student's ImageNet logits for the proxy-guidance KL.
    """

    def __init__(self, backbone: Backbone, num_classes: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.imagenet_head.requires_grad_(False)
        self.head = nn.Sequential(
            nn.Linear(backbone.feature_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_classes)
        )
        self.num_classes = num_classes

    @property
    def imagenet_head(self) -> nn.Linear:
        """The backbone's frozen ImageNet head (one module, stored once under ``backbone.imagenet_head``)."""
        return self.backbone.imagenet_head

    def forward(self, x: Tensor) -> ModelOutput:
        """x [B,3,H,W] RGB in [0,1] -> ModelOutput."""
        features = self.backbone(x)  # pooled once; both heads read it
        return ModelOutput(self.head(features), self.imagenet_head(features), features)

    def layer_groups(self) -> ParamGroups:
        """7 groups: the backbone's 6 (stem to last stage) + ``("head", ...)``; trainable parameters only."""
        head = [p for p in self.head.parameters() if p.requires_grad]
        return self.backbone.layer_groups() + [("head", head)]

    @property
    def last_layer_weight(self) -> Tensor:
        """[C, hidden] weight of the head's last Linear (source of the L2O observation's fc statistics)."""
        return cast(nn.Linear, self.head[-1]).weight

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trainable backbone parameters (the ImageNet-initialised ones), in group order."""
        return [p for _, params in self.backbone.layer_groups() for p in params]

    def task_parameters(self) -> list[nn.Parameter]:
        """Parameters of the new task head."""
        return list(self.head.parameters())


class Teacher(nn.Module):
    """Frozen ImageNet network: ``forward(x [B,3,H,W] in [0,1]) -> [B, 1000]`` logits, without autograd.

    All parameters have ``requires_grad=False`` and the module stays in eval mode whatever ``train()`` is called.
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
            p.grad = None
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """x [B,3,H,W] in [0,1] -> ImageNet logits of the pooled deepest features."""
        return self.backbone.imagenet_head(self.backbone(x))


def make_teacher(model: ASGClassifier) -> Teacher:
    """Deep copy of ``model``'s backbone + ImageNet head as it is now; call it before training (pretrained state)."""
    return Teacher(model.backbone)


def build_model(cfg: ModelConfig, num_classes: int, *, output_stride: int = 32) -> ASGClassifier:
    """Backbone ``cfg.backbone`` with ``cfg.weights`` + task head; channels_last memory format if asked.

    ``output_stride`` goes to ``build_backbone`` (32 everywhere; 16/8 for ResNets; ConfigError otherwise). It only
    changes ``backbone.forward_features``' map size; the classifier still pools it.
    """
    backbone = build_backbone(cfg.backbone, cfg.weights, output_stride=output_stride)
    model = ASGClassifier(backbone, num_classes, cfg.hidden_dim)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
