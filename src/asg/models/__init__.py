"""Networks: pretrained backbones (timm: EfficientNet-Lite, ResNet, ConvNeXt, DINOv2, CLIP, EVA02; torchvision VGG16
for FCN-8s), guidance heads, the ASG classifier and segmenters, and their teacher."""

from __future__ import annotations

from importlib import resources

from asg.models.backbones import BACKBONES, build_backbone
from asg.models.base import ASGNetwork, Backbone, ModelOutput
from asg.models.build import build_model
from asg.models.classifier import ASGClassifier, Teacher, make_teacher
from asg.models.segmenter import SEGMENTERS, ASGSegmenter, build_segmenter


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in index order (from ``asg/resources/imagenet_classes.txt``)."""
    text = resources.files("asg").joinpath("resources/imagenet_classes.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


__all__ = [
    "ASGClassifier",
    "ASGNetwork",
    "ASGSegmenter",
    "BACKBONES",
    "Backbone",
    "ModelOutput",
    "SEGMENTERS",
    "Teacher",
    "build_backbone",
    "build_model",
    "build_segmenter",
    "imagenet_class_names",
    "make_teacher",
]
