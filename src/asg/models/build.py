"""``build_model``: the ASG network of a recipe (classifier or segmenter), its guidance head and its adapters.

Outside both network modules so neither imports the other.
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from asg.config import ModelConfig
from asg.errors import ConfigError
from asg.models.backbones import BACKBONES_VIT, build_backbone
from asg.models.base import ASGNetwork, Backbone
from asg.models.classifier import ASGClassifier
from asg.models.segmenter import ASGSegmenter

TASKS = ("classification", "segmentation")


def backbone_from_config(cfg: ModelConfig, output_stride: int) -> Backbone:
    """``cfg.backbone`` with ``cfg.weights``, its guidance head (``cfg.guidance_head``) attached."""
    from asg.models.guidance import attach_guidance_head
    from asg.models.vit import VITS

    backbone = build_backbone(
        cfg.backbone,
        cfg.weights,
        output_stride=output_stride,
        input_size=cfg.input_size,
        stage_blocks=cfg.vit_blocks,
        timm_kwargs=cfg.timm_kwargs,
    )
    kind = cfg.guidance_head
    if kind == "auto":  # the backbone's own head, else its family's released one, else none
        kind = {"dinov2": "dinov2_linear" if cfg.guidance_file else "none", "clip": "clip_zeroshot"}.get(
            cfg.backbone.split("_")[0], "imagenet"
        )
        if "dinov3" in cfg.backbone:  # no released ImageNet head below ViT-7B: a user-trained one, else none
            kind = "linear" if cfg.guidance_file else "none"
    spec = VITS.get(cfg.backbone)
    clip = {
        "model": cfg.clip_model or (spec.open_clip_name if spec else ""),
        "templates": cfg.clip_templates,
        "cache_dir": cfg.clip_cache_dir,
    }
    file = cfg.guidance_file if kind in ("dinov2_linear", "linear") else cfg.weights
    attach_guidance_head(backbone, kind, file=file, clip=clip)
    return backbone


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
def build_model(cfg: ModelConfig, num_classes: int, *, task: str, output_stride: int | None = None) -> ASGNetwork: ...
def build_model(
    cfg: ModelConfig, num_classes: int, *, task: str = "classification", output_stride: int | None = None
) -> ASGNetwork:
    """The ASG network for ``task``: "classification" (``ASGClassifier``) or "segmentation" (``ASGSegmenter``).

    Backbone ``cfg.backbone`` with ``cfg.weights`` and guidance head ``cfg.guidance_head``; then LoRA
    (``cfg.lora_rank`` > 0) or a frozen backbone (``cfg.freeze_backbone``); channels_last if asked.
    ``output_stride`` (else ``cfg.output_stride``, else 32 for classification and the segmenter's default).
    """
    from asg.models.segmenter import SEGMENTERS, check_combination, make_segmenter_head

    if task not in TASKS:
        raise ConfigError(f"task {task!r}: valid tasks are {', '.join(TASKS)}")
    model: ASGNetwork
    if task == "segmentation":
        spec = check_combination(cfg)
        if output_stride is None:
            output_stride = cfg.output_stride if cfg.output_stride is not None else spec.output_stride
        if cfg.backbone in BACKBONES_VIT:
            output_stride = 32
        if cfg.segmenter == "fcn8s":
            from asg.models.vgg import vgg16

            backbone: Backbone = vgg16(cfg.weights, output_stride=output_stride, fcn=True)
        else:
            backbone = backbone_from_config(cfg, output_stride)
        model = ASGSegmenter(backbone, make_segmenter_head(cfg, backbone, num_classes), num_classes, cfg.segmenter)
        assert cfg.segmenter in SEGMENTERS
    else:
        if output_stride is None:
            output_stride = cfg.output_stride if cfg.output_stride is not None else 32
        model = ASGClassifier(backbone_from_config(cfg, output_stride), num_classes, cfg.hidden_dim)
    if cfg.lora_rank > 0:
        from asg.models.lora import apply_lora

        apply_lora(model.backbone, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_blocks)
    elif cfg.freeze_backbone:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    model.saves_trainable_only = cfg.lora_rank > 0 or cfg.freeze_backbone
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    assert isinstance(model, (ASGClassifier, ASGSegmenter))
    return model
