"""ASG's segmentation networks (docs/segmentation.md, "Models"): backbone + dense head + the backbone's frozen
ImageNet head.

``ASGSegmenter`` has ``ASGClassifier``'s contract, so the training loop, the methods and the L2O controllers use it
unchanged: ``forward(x [B,3,H,W] in [0,1]) -> ModelOutput(logits [B,C,H,W] at the input size, imagenet_logits
[B,1000], features [B,D])``, ``backbone``, ``imagenet_head``, ``num_classes``, 7 ``layer_groups`` (the last one
``"head"``), ``last_layer_weight``, ``pretrained_parameters``, ``task_parameters``.
``imagenet_logits`` is the frozen ImageNet head on the student's pooled deepest map (``backbone.forward_head``),
one KL term per image, not per pixel; the dense head never feeds it.

Segmenters (``cfg.model.segmenter``), each on its own backbones:

    fcn8s      vgg16                                 FCN-8s at-once, output stride 32
    deeplabv3  resnet50, resnet101                   DeepLabv3 ASPP head, dilated ResNet, output stride 8 (16, 32)
    lraspp     efficientnet_lite0, efficientnet_lite2  LR-ASPP (MobileNetV3's light head), output stride 32
    fpn        efficientnet_lite0/2, resnet50/101,     light FPN decoder on the stride 4-32 maps, logits at stride 4
               convnext_*, ViTs (DINOv2, CLIP, EVA02)  (ViTs: through ViTDet's simple feature pyramid)

Why an FPN on ViTs (and not UPerNet or Mask2Former): the pretrained blocks carry the representation, the decoder
only has to bring 4 blocks' stride-14/16 tokens back to stride 4; ViTDet (Li et al. 2022) showed that a simple
pyramid (deconvolutions up, pooling down) from plain ViT features is as good as a hierarchical backbone, and an FPN
on it is a few hundred thousand parameters, so LoRA or a frozen backbone stays the bulk of the training. Rein and
the frozen-foundation-model DGSS papers use Mask2Former, which no maintained, installable library here provides.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.lraspp import LRASPPHead
from torchvision.ops import FeaturePyramidNetwork

from asg.config import ModelConfig
from asg.errors import ConfigError
from asg.models.base import ASGNetwork, Backbone, GroupModules, ModelOutput, ParamGroups
from asg.models.dinov3 import CONVNEXTS as DINOV3_CONVNEXTS
from asg.models.dinov3 import VITS as DINOV3_VITS
from asg.models.vgg import VGGBackbone


class SegmentationHead(nn.Module):
    """A dense head: ``forward(stages, size) -> logits [B, C, *size]`` from the backbone's ``forward_stages`` maps.

    ``group_modules(backbone)`` gives the network's 7 module groups (default: the backbone's 6 + ``("head",
    [self])``); ``last_layer_weight`` the 2-D weight of the final classifier (for the L2O observation).
    """

    def forward(self, stages: list[Tensor], size: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    def group_modules(self, backbone: Backbone) -> GroupModules:
        return backbone.group_modules() + [("head", [self])]

    def layer_groups(self, backbone: Backbone) -> ParamGroups:
        """The network's trainable parameter groups: the backbone's, then ``("head", ...)``."""
        return backbone.layer_groups() + [("head", [p for p in self.parameters() if p.requires_grad])]

    @property
    def last_layer_weight(self) -> Tensor:
        raise NotImplementedError


def bilinear_kernel(channels: int, kernel_size: int) -> Tensor:
    """[channels, channels, k, k] ``ConvTranspose2d`` weight: channel c upsampled bilinearly into channel c only.

    The 1-D profile is ``1 - |i - centre| / f`` with ``f = ceil(k / 2)`` and the centre ``f - 1`` (odd k) or
    ``f - 0.5`` (even k), e.g. ``[0.25, 0.75, 0.75, 0.25]`` for k = 4 (FCN's initialisation).
    """
    factor = (kernel_size + 1) // 2
    centre = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    profile = 1 - (torch.arange(kernel_size, dtype=torch.float64) - centre).abs() / factor
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    idx = torch.arange(channels)
    weight[idx, idx] = torch.outer(profile, profile).float()
    return weight


class FCN8sHead(SegmentationHead):
    """FCN-8s at-once on a VGG16 built with ``fcn=True`` (conv1_1 padding 100, pools rounding up).

    pool5 -> fc6 (7x7 conv, no padding) -> ReLU -> Dropout2d -> fc7 (1x1 conv) -> ReLU -> Dropout2d -> score_fr
    -> upscore2 (x2); + score_pool4(0.01 * pool4) cropped at offset 5 -> upscore_pool4 (x2); + score_pool3(1e-4
    * pool3) cropped at offset 9 -> upscore8 (x8), cropped at offset 31 to the input size.
    fc6/fc7 start as the backbone's ImageNet fc6/fc7 ``Linear`` weights reshaped into convolutions (trainable
    copies; the frozen ``imagenet_head`` keeps its own). The score convolutions start at zero; the transposed
    convolutions (no bias) start as bilinear upsampling and are trained. Dropout2d is only active in ``train()``
    mode (the official run trains in eval mode: off).
    Groups: the backbone's ``conv1`` ... ``conv5``, ``fc`` (fc6, fc7), ``head`` (score_fr, score_pool3,
    score_pool4, upscore2, upscore_pool4, upscore8): L2O's ``conv1..conv5, FC, fc_new``.
    """

    def __init__(self, backbone: VGGBackbone, num_classes: int) -> None:
        super().__init__()
        if not (isinstance(backbone, VGGBackbone) and backbone.fcn):
            raise ConfigError("FCN-8s needs a VGG16 backbone built with fcn=True (conv1_1 padding 100)")
        fc6, fc7 = backbone.imagenet_head[0], backbone.imagenet_head[3]
        assert isinstance(fc6, nn.Linear) and isinstance(fc7, nn.Linear)
        self.fc6 = nn.utils.skip_init(nn.Conv2d, 512, 4096, 7)
        self.fc7 = nn.utils.skip_init(nn.Conv2d, 4096, 4096, 1)
        with torch.no_grad():
            for conv, linear in ((self.fc6, fc6), (self.fc7, fc7)):
                conv.weight.copy_(linear.weight.view(conv.weight.shape))
                assert conv.bias is not None
                conv.bias.copy_(linear.bias)
        self.relu = nn.ReLU()
        self.drop6, self.drop7 = nn.Dropout2d(), nn.Dropout2d()
        self.score_fr = nn.Conv2d(4096, num_classes, 1)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.score_pool3 = nn.Conv2d(256, num_classes, 1)
        with torch.no_grad():
            for conv in (self.score_fr, self.score_pool4, self.score_pool3):
                for param in conv.parameters():  # weight and bias
                    param.zero_()
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
        with torch.no_grad():
            for up in (self.upscore2, self.upscore_pool4, self.upscore8):
                up.weight.copy_(bilinear_kernel(num_classes, up.kernel_size[0]))

    def forward(self, stages: list[Tensor], size: tuple[int, int]) -> Tensor:
        pool3, pool4, pool5 = stages[2], stages[3], stages[4]
        x = self.drop6(self.relu(self.fc6(pool5)))
        x = self.drop7(self.relu(self.fc7(x)))
        x = self.upscore2(self.score_fr(x))  # stride 16
        x = x + _crop(self.score_pool4(pool4 * 0.01), 5, x.shape[-2:])
        x = self.upscore_pool4(x)  # stride 8
        x = x + _crop(self.score_pool3(pool3 * 1e-4), 9, x.shape[-2:])
        return _crop(self.upscore8(x), 31, size).contiguous()

    def group_modules(self, backbone: Backbone) -> GroupModules:
        assert isinstance(backbone, VGGBackbone)
        head = [self.score_fr, self.score_pool3, self.score_pool4, self.upscore2, self.upscore_pool4, self.upscore8]
        return backbone.conv_groups() + [("fc", [self.fc6, self.fc7]), ("head", list(head))]

    def layer_groups(self, backbone: Backbone) -> ParamGroups:
        return [
            (name, [p for m in mods for p in m.parameters() if p.requires_grad])
            for name, mods in self.group_modules(backbone)
        ]

    @property
    def last_layer_weight(self) -> Tensor:
        """``upscore8.weight`` [C, C, 16, 16] flattened to [C, C * 256] (the official observation)."""
        return self.upscore8.weight.flatten(1)


def _crop(x: Tensor, offset: int, size: tuple[int, int] | torch.Size) -> Tensor:
    return x[:, :, offset : offset + size[0], offset : offset + size[1]]


class DeepLabV3Head(SegmentationHead):
    """DeepLabv3's ASPP head (torchvision ``DeepLabHead``: rates 12/24/36 + image pooling, 3x3 conv-BN-ReLU,
    1x1 classifier) on the deepest map, logits bilinearly upsampled to the input size.

    This is v3 ASPP, not DeepLab-v2's sum of four dilated classifiers: it is what CSG's "DeepLab" really is.
    The BatchNorms are new (running mean 0, variance 1); ``last_layer_weight``: the 1x1
    classifier's [C, 256].
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = DeepLabHead(in_channels, num_classes)

    def forward(self, stages: list[Tensor], size: tuple[int, int]) -> Tensor:
        return F.interpolate(self.classifier(stages[-1]), size=size, mode="bilinear", align_corners=False)

    @property
    def last_layer_weight(self) -> Tensor:
        final = self.classifier[-1]
        assert isinstance(final, nn.Conv2d)
        return final.weight.flatten(1)


class LRASPPSegHead(SegmentationHead):
    """LR-ASPP (torchvision ``LRASPPHead``): low = the stride-8 stage map, high = the deepest map; logits at
    stride 8 bilinearly upsampled to the input size. ``last_layer_weight``: the high branch's 1x1 classifier
    [C, inter_channels] (the low branch has its own [C, low_channels] one).
    """

    def __init__(self, backbone: Backbone, num_classes: int, inter_channels: int = 128) -> None:
        super().__init__()
        self.low_index = backbone.stage_strides.index(8)
        low, high = backbone.stage_channels[self.low_index], backbone.stage_channels[-1]
        self.classifier = LRASPPHead(low, high, num_classes, inter_channels)

    def forward(self, stages: list[Tensor], size: tuple[int, int]) -> Tensor:
        logits = self.classifier({"low": stages[self.low_index], "high": stages[-1]})
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    @property
    def last_layer_weight(self) -> Tensor:
        return self.classifier.high_classifier.weight.flatten(1)


class FPNSegHead(SegmentationHead):
    """A light FPN decoder (torchvision ``FeaturePyramidNetwork``): 1x1 lateral convolutions on the backbone's
    maps from stride ``finest_stride`` (``model.fpn_finest_stride``: 4, or 2) to 32, to ``channels``
    (``model.fpn_channels``), top-down sums, a 3x3 convolution per level; the finest level (which carries the
    coarser levels' semantics through the top-down path) -> 3x3 conv + ReLU -> 1x1 classifier -> logits
    upsampled bilinearly to the input size.

    Why: thin parts (the digit scenes' strokes are 3-6 px wide) need detail that stride-8 logits blur away (an
    ideal stride-8 prediction, upsampled, reaches a mean digit IoU of about 35% there; stride 4: 80%; stride 2:
    99%), and their class needs the stride-16/32 context. No normalisation layer, so the head behaves alike with
    ``optim.bn_mode`` frozen or trained. ``last_layer_weight``: the classifier's [C, channels].
    """

    def __init__(self, backbone: Backbone, num_classes: int, channels: int = 64, finest_stride: int = 4) -> None:
        super().__init__()
        in_channels, strides = list(backbone.stage_channels), list(backbone.stage_strides)
        self.pyramid: SimplePyramid | None = None
        if len(set(strides)) == 1:  # a ViT: all maps at the patch stride
            self.pyramid = SimplePyramid(in_channels)
            in_channels, strides = self.pyramid.out_channels, list(SimplePyramid.strides)
        if finest_stride not in strides:
            raise ConfigError(
                f"model.fpn_finest_stride={finest_stride}: the backbone's maps have strides {sorted(set(strides))}"
            )
        self.first = strides.index(finest_stride)
        self.fpn = FeaturePyramidNetwork(in_channels[self.first :], channels)
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, stages: list[Tensor], size: tuple[int, int]) -> Tensor:
        if self.pyramid is not None:
            stages = self.pyramid(stages)
        maps = OrderedDict((str(i), m) for i, m in enumerate(stages[self.first :]))
        finest = self.fpn(maps)["0"]
        return F.interpolate(self.classifier(self.fuse(finest)), size=size, mode="bilinear", align_corners=False)

    @property
    def last_layer_weight(self) -> Tensor:
        return self.classifier.weight.flatten(1)


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid on 4 ViT maps [B, D_i, h, w] at the patch stride p: x4 (two 2x2 transposed
    convolutions with GELU, D/4 channels), x2 (one, D/2), x1, x1/2 (2x2 max pool) -> nominal strides 4, 8, 16, 32
    (exactly these for p = 16; 3.5, 7, 14, 28 for p = 14)."""

    strides = (4, 8, 16, 32)

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ConfigError(f"model.vit_blocks: the ViT pyramid takes 4 blocks, got {len(channels)}")
        d0, d1, _, _ = channels
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(d0, d0 // 2, 2, 2), nn.GELU(), nn.ConvTranspose2d(d0 // 2, d0 // 4, 2, 2)
        )
        self.up2 = nn.ConvTranspose2d(d1, d1 // 2, 2, 2)
        self.down2 = nn.MaxPool2d(2, ceil_mode=True)
        self.out_channels = [d0 // 4, d1 // 2, channels[2], channels[3]]

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class ASGSegmenter(ASGNetwork):
    """Backbone -> ``forward_stages`` maps -> dense ``head`` (logits at the input size); the frozen ImageNet head
    on the pooled deepest map gives the student's ImageNet logits (``ASGClassifier``'s contract).
    """

    def __init__(self, backbone: Backbone, head: SegmentationHead, num_classes: int, segmenter: str = "") -> None:
        super().__init__()
        self.backbone = backbone
        self._freeze_guidance_head()
        self.head: SegmentationHead = head
        self.num_classes = num_classes
        self.segmenter = segmenter

    def forward(self, x: Tensor) -> ModelOutput:
        """x [B,3,H,W] RGB in [0,1] -> ModelOutput(logits [B,C,H,W], imagenet_logits [B,1000], features [B,D])."""
        return self.forward_with_stages(x)[0]

    def forward_with_stages(self, x: Tensor) -> tuple[ModelOutput, list[Tensor]]:
        """``forward(x)`` and the backbone's stage maps the dense head read (for CSG)."""
        stages, features = self.backbone.forward_dense(self.backbone.normalize(x))
        logits = self.head(stages, (x.shape[-2], x.shape[-1]))
        return ModelOutput(logits, self.imagenet_head(features), features), stages

    def group_modules(self) -> GroupModules:
        """The 7 module groups: 6 ImageNet-initialised ones, then the new ``"head"``."""
        return self.head.group_modules(self.backbone)

    def layer_groups(self) -> ParamGroups:
        """7 groups of trainable parameters; the last is ``"head"`` (the new layers)."""
        return self.head.layer_groups(self.backbone)

    @property
    def last_layer_weight(self) -> Tensor:
        """2-D weight behind the L2O observation's fc statistics (see each head)."""
        return self.head.last_layer_weight


@dataclass(frozen=True)
class SegmenterSpec:
    backbones: tuple[str, ...]
    output_stride: int  # default when neither the caller nor cfg.output_stride sets one
    make_head: Callable[[Backbone, int], SegmentationHead]


def _fcn8s_head(backbone: Backbone, num_classes: int) -> SegmentationHead:
    assert isinstance(backbone, VGGBackbone)
    return FCN8sHead(backbone, num_classes)


def _fpn_head(backbone: Backbone, num_classes: int, cfg: ModelConfig | None = None) -> SegmentationHead:
    if cfg is None:
        return FPNSegHead(backbone, num_classes)
    return FPNSegHead(backbone, num_classes, cfg.fpn_channels, cfg.fpn_finest_stride)


_FPN_BACKBONES = (
    *("efficientnet_lite0", "efficientnet_lite2", "resnet50", "resnet101", "convnext_tiny", "convnext_base"),
    *("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "clip_vitb16", "clip_vitl14", "eva02_base"),
    *DINOV3_VITS,
    *DINOV3_CONVNEXTS,
)
SEGMENTERS: dict[str, SegmenterSpec] = {
    "fcn8s": SegmenterSpec(("vgg16",), 32, _fcn8s_head),
    "deeplabv3": SegmenterSpec(("resnet50", "resnet101"), 8, lambda bb, n: DeepLabV3Head(bb.stage_channels[-1], n)),
    "lraspp": SegmenterSpec(("efficientnet_lite0", "efficientnet_lite2"), 32, LRASPPSegHead),
    "fpn": SegmenterSpec(_FPN_BACKBONES, 32, _fpn_head),
}


def valid_combinations() -> str:
    """'fcn8s + vgg16; deeplabv3 + resnet50|resnet101; ...'."""
    return "; ".join(f"{name} + {'|'.join(spec.backbones)}" for name, spec in SEGMENTERS.items())


def check_combination(cfg: ModelConfig) -> SegmenterSpec:
    """The spec of ``cfg.segmenter``; ConfigError for an unknown one or a backbone it does not run on."""
    if cfg.segmenter not in SEGMENTERS:
        raise ConfigError(f"model.segmenter: unknown segmenter {cfg.segmenter!r}; valid: {', '.join(SEGMENTERS)}")
    spec = SEGMENTERS[cfg.segmenter]
    if cfg.backbone not in spec.backbones:
        raise ConfigError(
            f"model.segmenter={cfg.segmenter!r} does not run on model.backbone={cfg.backbone!r}; "
            f"valid combinations: {valid_combinations()}"
        )
    return spec


def make_segmenter_head(cfg: ModelConfig, backbone: Backbone, num_classes: int) -> SegmentationHead:
    """The dense head ``cfg.segmenter`` on ``backbone``."""
    if cfg.segmenter == "fpn":
        return _fpn_head(backbone, num_classes, cfg)
    return SEGMENTERS[cfg.segmenter].make_head(backbone, num_classes)
