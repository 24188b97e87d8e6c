"""Networks: pretrained backbones (timm: EfficientNet-Lite, ResNet, ConvNeXt, DINOv2, CLIP, EVA02; torchvision VGG16
for FCN-8s), guidance heads, the ASG classifier and segmenters, and their teacher."""

from __future__ import annotations

from asg.models.backbones import BACKBONES, build_backbone
from asg.models.base import ASGNetwork, Backbone, ModelOutput
from asg.models.build import build_model
from asg.models.classifier import ASGClassifier, Teacher, make_teacher
from asg.models.guidance import imagenet_class_names
from asg.models.segmenter import SEGMENTERS, ASGSegmenter

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
    "imagenet_class_names",
    "make_teacher",
]
