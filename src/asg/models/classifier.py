"""ASG's classification network (spec 2.1): backbone + new task head + frozen ImageNet head, and the teacher.

``build_model`` also builds the segmentation networks (``asg.models.segmenter``), which share this contract.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast, overload

import torch
from torch import Tensor, nn

from asg.config import ModelConfig
from asg.errors import ConfigError
from asg.models.backbones import Backbone, ParamGroups, build_backbone

if TYPE_CHECKING:
    from asg.models.segmenter import ASGSegmenter

TASKS = ("classification", "segmentation")


@dataclass
class ModelOutput:
    logits: Tensor  # [B, C] task logits from the new head ([B, C, H, W] at input size for a segmenter)
    imagenet_logits: Tensor  # [B, 1000] frozen ImageNet head on the trained (pooled deepest) features
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
    def imagenet_head(self) -> nn.Module:
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
        self.backbone.set_output_stride(32)
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


def make_teacher(model: ASGClassifier | ASGSegmenter) -> Teacher:
    """Deep copy of ``model``'s backbone + ImageNet head as it is now, at output stride 32 (see ``Teacher``).

    Call it before training (pretrained state).
    """
    return Teacher(model.backbone)


@overload
def build_model(
    cfg: ModelConfig,
    num_classes: int,
    *,
    task: Literal["classification"] = "classification",
    output_stride: int | None = None,
) -> ASGClassifier: ...
@overload
def build_model(
    cfg: ModelConfig, num_classes: int, *, task: Literal["segmentation"], output_stride: int | None = None
) -> ASGSegmenter: ...
@overload
def build_model(
    cfg: ModelConfig, num_classes: int, *, task: str, output_stride: int | None = None
) -> ASGClassifier | ASGSegmenter: ...
def build_model(
    cfg: ModelConfig, num_classes: int, *, task: str = "classification", output_stride: int | None = None
) -> ASGClassifier | ASGSegmenter:
    """The ASG network for ``task``: "classification" (``ASGClassifier``) or "segmentation" (``ASGSegmenter``).

    Classification: backbone ``cfg.backbone`` with ``cfg.weights`` + task head; channels_last memory format if
    asked. Segmentation: ``asg.models.segmenter.build_segmenter`` (head ``cfg.segmenter``).
    ``output_stride`` (else ``cfg.output_stride``, else 32 for classification and the segmenter's default) goes to
    ``build_backbone`` (32 everywhere; 16/8 for ResNets; ConfigError otherwise). For the classifier it only
    changes ``backbone.forward_features``' map size; the classifier still pools it.
    """
    if task == "segmentation":
        from asg.models.segmenter import build_segmenter

        return build_segmenter(cfg, num_classes, output_stride=output_stride)
    if task != "classification":
        raise ConfigError(f"task {task!r}: valid tasks are {', '.join(TASKS)}")
    if output_stride is None:
        output_stride = cfg.output_stride if cfg.output_stride is not None else 32
    backbone = build_backbone(cfg.backbone, cfg.weights, output_stride=output_stride)
    model = ASGClassifier(backbone, num_classes, cfg.hidden_dim)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
