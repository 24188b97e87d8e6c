"""VGG16 backbone (torchvision architecture; weights from torch's local hub cache or a file).

The one hand-written backbone left: FCN-8s needs conv1_1 with padding 100 and ceil-mode pools, which timm's VGG
(``timm.models.vgg``, with a ConvMlp pre-logits) does not build.

``forward_stages``: pool1 ... pool5 (64, 128, 256, 512, 512 channels; nominal strides 2, 4, 8, 16, 32);
``forward_features``: pool5. ``forward_head`` pools pool5 as torchvision's VGG does (``AdaptiveAvgPool2d(7, 7)``,
flattened: D = 25088) and applies ``imagenet_head``, the ImageNet classifier fc6-fc7-fc8 (``Linear`` layers with
ReLU; frozen by the ASG models). Its two dropouts are ``nn.Identity``: the head is a fixed function, as in the
official code where the KL path always runs the teacher's classifier in eval mode. Output stride 32 only.

``fcn=True`` builds FCN-8s's variant (docs/segmentation.md, "Models"): conv1_1 with ``padding=100`` and max pools
that round up (``ceil_mode=True``, as the FCN's Caffe pools; the official ASG student and its VGG16 teacher both
have the two), so any input size >= 1 px gives a pool5 of at least 7x7. Map sizes then are
``ceil((H + 198) / 2**i)`` after pool i instead of ``floor(H / 2**i)``.
The same weights fit both variants.

Layer groups (6): ``conv1_1`` (the first conv alone, as ResNet's conv1/bn1 stem split), ``conv1_2``, ``conv2``,
``conv3``, ``conv4``, ``conv5`` (the convolutions of each block). ``conv_groups`` gives L2O's five
``conv1`` ... ``conv5`` groups, which FCN-8s completes with its ``fc`` (fc6/fc7 convs) and ``head`` groups.
Input normalisation: ImageNet mean/std. Weight files use torchvision's key layout (``features.*``,
``classifier.*``) or this module's (``imagenet_head.*``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from asg.errors import ConfigError
from asg.models.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, hub_cache_file, load_state_dict_file

CACHE_FILE = "vgg16-397923af.pth"  # torchvision IMAGENET1K_V1, the weights ASG used
_URL = "https://download.pytorch.org/models/"
_POOLS = (4, 9, 16, 23, 30)  # indices of the max pools in torchvision's vgg16().features


class VGGBackbone(Backbone):
    """torchvision VGG16 ``features`` (13 convs + 5 max pools) and its ImageNet classifier as ``imagenet_head``."""

    def __init__(self, output_stride: int = 32, fcn: bool = False) -> None:
        if output_stride != 32:
            raise ConfigError(f"output_stride={output_stride!r}: vgg16 supports only output stride 32")
        super().__init__(512 * 7 * 7, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, output_stride=32)
        net = torchvision.models.vgg16(weights=None)
        self.fcn = fcn
        self.stage_channels = (64, 128, 256, 512, 512)
        self.features = net.features
        if fcn:
            first = self.features[0]
            assert isinstance(first, nn.Conv2d)
            first.padding = (100, 100)
            for idx in _POOLS:
                pool = self.features[idx]
                assert isinstance(pool, nn.MaxPool2d)
                pool.ceil_mode = True
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        head = net.classifier  # Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        self.imagenet_head: nn.Sequential = nn.Sequential(
            head[0], nn.ReLU(), nn.Identity(), head[3], nn.ReLU(), nn.Identity(), head[6]
        )

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        stages = []
        start = 0
        for end in _POOLS:
            for layer in self.features[start : end + 1]:
                x = layer(x)
            stages.append(x)
            start = end + 1
        return stages

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """pool5 [B, 512, h, w] -> ``AdaptiveAvgPool2d(7, 7)`` flattened [B, 25088], or ImageNet logits [B, 1000]."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.imagenet_head(x)

    def conv_groups(self) -> list[tuple[str, list[nn.Module]]]:
        """L2O's five groups ``conv1`` ... ``conv5``: the convolutions of each VGG block."""
        groups = []
        start = 0
        for i, end in enumerate(_POOLS):
            convs: list[nn.Module] = [m for m in self.features[start:end] if isinstance(m, nn.Conv2d)]
            groups.append((f"conv{i + 1}", convs))
            start = end + 1
        return groups

    def group_modules(self) -> list[tuple[str, list[nn.Module]]]:
        (_, conv1), *rest = self.conv_groups()
        return [("conv1_1", [conv1[0]]), ("conv1_2", [conv1[1]]), *rest]

    def translate_key(self, key: str) -> str:
        """torchvision layout (head ``classifier.{0,3,6}``) -> own layout (``imagenet_head.{0,3,6}``)."""
        return "imagenet_head." + key[len("classifier.") :] if key.startswith("classifier.") else key


def cached_weights_path() -> Path:
    """torchvision's VGG16 ImageNet weight file in torch's hub cache; WeightsError naming it if absent."""
    return hub_cache_file("vgg16", (CACHE_FILE,), _URL, "torchvision layout")


def vgg16(weights: str = "imagenet", *, output_stride: int = 32, fcn: bool = False) -> VGGBackbone:
    """Build VGG16 with weights 'imagenet' (local cache), 'none' or a file path; ``fcn``: FCN-8s's padding 100.

    ``output_stride`` must be 32 (ConfigError otherwise, before any weights are read).
    """
    if output_stride != 32:
        raise ConfigError(f"output_stride={output_stride!r}: vgg16 supports only output stride 32")
    path = None if weights == "none" else cached_weights_path() if weights == "imagenet" else weights
    state = None if path is None else load_state_dict_file(path)  # before the 138M-parameter build
    backbone = VGGBackbone(output_stride=output_stride, fcn=fcn)
    if state is not None:
        backbone.load_weights(state, source=str(path))
    return backbone
