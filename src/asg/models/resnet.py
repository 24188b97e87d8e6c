"""ResNet-50/101 backbones (torchvision architecture; weights from torch's local hub cache or a file).

Layer groups are spec 3.2's: ``conv1``, ``bn1`` (the stem BN alone), ``layer1`` ... ``layer4`` (each with its
own BNs and downsample branch). ``forward_features``: layer4's [B, 2048, h, w] map; ``forward_head`` pools it and
applies ``imagenet_head`` (= ``fc``). Output stride 32, or 16 / 8 for dense prediction: torchvision's
``replace_stride_with_dilation`` dilates layer4 (16) or layer3+layer4 (8) instead of striding them, with the same
parameters (so the same weight files and state-dict keys); ``set_output_stride`` re-strides a built backbone in
place (the teacher of a dilated student is the undilated ImageNet network, ``asg.models.classifier.Teacher``).
``forward_stages``: stem (conv1-bn1-relu, 64 ch, stride 2), layer1 (256, 4), layer2 (512, 8), layer3 (1024, 16),
layer4 (2048, 32); strides capped at the output stride.
Input normalisation: ImageNet mean/std. Weight files may use torchvision's or timm's key layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from asg.errors import ConfigError
from asg.models.backbones import Backbone, hub_cache_file, load_state_dict_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision IMAGENET1K_V1 weights (the ones ASG used): current file name first, then the legacy name
CACHE_FILES = {
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
    "resnet101": ("resnet101-63fe2227.pth", "resnet101-5d3b4d8f.pth"),
}
_URL = "https://download.pytorch.org/models/"
# output stride -> torchvision's replace_stride_with_dilation for (layer2, layer3, layer4)
_DILATION = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


class ResNetBackbone(Backbone):
    """torchvision ResNet without its head in the feature path; D = 2048; output stride 32, 16 or 8."""

    def __init__(self, arch: str, output_stride: int = 32) -> None:
        _check_output_stride(arch, output_stride)
        super().__init__(2048, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, output_stride=output_stride)
        net = getattr(torchvision.models, arch)(weights=None, replace_stride_with_dilation=_DILATION[output_stride])
        self.arch = arch
        self.stage_channels = (64, 256, 512, 1024, 2048)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.imagenet_head: nn.Linear = net.fc

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        c2 = self.layer1(self.maxpool(stem))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [stem, c2, c3, c4, self.layer4(c4)]

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def set_output_stride(self, output_stride: int) -> None:
        """Re-stride layer3/layer4 in place to ``output_stride`` (32, 16 or 8); parameters stay the same tensors.

        Copies stride, padding and dilation of every convolution from torchvision's architecture built for that
        output stride, so the result computes exactly what a backbone built with it computes.
        """
        _check_output_stride(self.arch, output_stride)
        if output_stride == self.output_stride:
            return
        with torch.device("meta"):  # the architecture only: no memory, no initialisation cost
            ref = getattr(torchvision.models, self.arch)(
                weights=None, replace_stride_with_dilation=_DILATION[output_stride]
            )
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for (own_name, own), (ref_name, other) in zip(
                getattr(self, name).named_modules(), getattr(ref, name).named_modules(), strict=True
            ):
                if own_name != ref_name:  # pragma: no cover - same architecture by construction
                    raise RuntimeError(f"{self.arch}.{name}: {own_name} != {ref_name}")
                if isinstance(own, nn.Conv2d) and isinstance(other, nn.Conv2d):
                    own.stride, own.padding, own.dilation = other.stride, other.padding, other.dilation
        self.output_stride = output_stride

    def group_modules(self) -> list[tuple[str, list[nn.Module]]]:
        names = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
        return [(name, [getattr(self, name)]) for name in names]

    def translate_key(self, key: str) -> str:
        """torchvision / timm layout (head ``fc``) -> own layout (head ``imagenet_head``)."""
        return "imagenet_head." + key[3:] if key.startswith("fc.") else key


def _check_output_stride(arch: str, output_stride: int) -> None:
    if output_stride not in _DILATION:
        raise ConfigError(
            f"output_stride={output_stride!r}: {arch} supports output stride {', '.join(map(str, _DILATION))}"
        )


def cached_weights_path(arch: str) -> Path:
    """The torchvision ImageNet weight file for ``arch`` in torch's hub cache; WeightsError if absent."""
    return hub_cache_file(arch, CACHE_FILES[arch], _URL, "torchvision or timm layout")


def resnet(arch: str, weights: str = "imagenet", *, output_stride: int = 32) -> ResNetBackbone:
    """Build ``resnet50`` / ``resnet101`` with weights 'imagenet' (local cache), 'none' or a file path.

    ``output_stride`` 32, 16 or 8 (ConfigError otherwise, before any weights are read).
    """
    backbone = ResNetBackbone(arch, output_stride=output_stride)
    if weights == "none":
        return backbone
    path = cached_weights_path(arch) if weights == "imagenet" else weights
    backbone.load_weights(load_state_dict_file(path), source=str(path))
    return backbone
