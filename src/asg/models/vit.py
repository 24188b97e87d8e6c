"""Foundation ViT backbones through timm: DINOv2 ViT-S/B/L/14, DINOv3 ViT-S/S+/B/L/H+/16 (``asg.models.dinov3``),
CLIP ViT-B/16 and L/14 image towers, EVA02-B/14.

``forward_features``: the final normed tokens [B, N, D]; ``forward_head(tokens, pre_logits=True)`` pools them:
DINOv2 as its released linear classifiers read it (``cls_mean``: normed class token concatenated with the mean
normed patch token, D = 2 x width), DINOv3 as upstream (normed class token, D = width), CLIP and EVA02 as timm
does (class token / mean token, D = width).

Position embeddings: built for ``input_size`` (``model.input_size``, else the backbone's native size); timm resamples
the file's grid to it on load (bicubic, ``checkpoint_filter_fn``) and, with ``dynamic_img_size``, interpolates again
for any other input size at run time, so training crops need not be square or native. DINOv3 has no position
table: its rotary embeddings are computed for each input's grid.

Dense maps (``forward_stages``): the tokens of 4 blocks at quarter depths (``model.vit_blocks``; default
``d/4-1, d/2-1, 3d/4-1, d-1``: 2, 5, 8, 11 for 12 blocks, as DPT and ViT-Adapter read ViT-B) as [B, D, H/p, W/p]
maps at the patch stride p. The segmenter's ``SimplePyramid`` (ViTDet) turns them into strides 4-32.

Layer groups (6): ``embed`` (patch embedding, class/register tokens, position embedding, CLIP's pre-norm), the
blocks in 4 equal quarters ``blocks1`` ... ``blocks4``, ``norm`` (final norm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from asg.models.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, NoGuidanceHead
from asg.models.dinov3 import VITS as DINOV3_VITS
from asg.models.dinov3 import WHERE as DINOV3_WHERE
from asg.models.dinov3 import qkv_bias_variant
from asg.models.timm_backbone import GroupPrefixes, TimmBackbone, create_timm, is_own_layout


@dataclass(frozen=True)
class ViTSpec:
    timm_name: str
    input_size: int
    pool: str  # "cls_mean" (DINOv2 linear-head input) | "timm" (the model's own pooling)
    clip: bool  # an open_clip file: image tower here, text tower for the zero-shot head
    file: str  # the weight file a recipe names, and where it comes from
    url: str
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    open_clip_name: str = ""
    family: str = ""  # "dinov3": its weights' file rules (asg.models.dinov3)
    timm_args: tuple[tuple[str, Any], ...] = ()  # extra timm.create_model arguments


_FB = "https://dl.fbaipublicfiles.com/dinov2/"
_HF = "https://huggingface.co/timm/"
_CLIP_B, _CLIP_L = "vit_base_patch16_clip_quickgelu_224", "vit_large_patch14_clip_quickgelu_224"
VITS: dict[str, ViTSpec] = {
    "dinov2_vits14": ViTSpec(
        "vit_small_patch14_dinov2", 224, "cls_mean", False, "dinov2_vits14_pretrain.pth", _FB + "dinov2_vits14/"
    ),
    "dinov2_vitb14": ViTSpec(
        "vit_base_patch14_dinov2", 224, "cls_mean", False, "dinov2_vitb14_pretrain.pth", _FB + "dinov2_vitb14/"
    ),
    "dinov2_vitl14": ViTSpec(
        "vit_large_patch14_dinov2", 224, "cls_mean", False, "dinov2_vitl14_pretrain.pth", _FB + "dinov2_vitl14/"
    ),
    "clip_vitb16": ViTSpec(
        _CLIP_B,
        224,
        "timm",
        True,
        "open_clip_model.safetensors",
        f"{_HF}{_CLIP_B}.openai/",
        CLIP_MEAN,
        CLIP_STD,
        "ViT-B-16-quickgelu",
    ),
    "clip_vitl14": ViTSpec(
        _CLIP_L,
        224,
        "timm",
        True,
        "open_clip_model.safetensors",
        f"{_HF}{_CLIP_L}.openai/",
        CLIP_MEAN,
        CLIP_STD,
        "ViT-L-14-quickgelu",
    ),
    "eva02_base": ViTSpec(
        "eva02_base_patch14_448",
        448,
        "timm",
        False,
        "model.safetensors",
        _HF + "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k/",
        CLIP_MEAN,
        CLIP_STD,
    ),
}


def _dinov3_specs() -> dict[str, ViTSpec]:
    return {
        name: ViTSpec(
            timm_name,
            224,
            "timm",
            False,
            f"{stem}_pretrain_lvd1689m-<hash>.pth",
            DINOV3_WHERE,
            family="dinov3",
            timm_args=(("global_pool", "token"),),
        )
        for name, (timm_name, stem) in DINOV3_VITS.items()
    }


VITS.update(_dinov3_specs())  # DINOv3: upstream class-token pooling, RoPE (any input size)


def default_blocks(depth: int) -> tuple[int, ...]:
    """4 blocks at quarter depths: ``d/4-1, d/2-1, 3d/4-1, d-1`` (at least block 0)."""
    return tuple(sorted({max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)}))


class TimmViTBackbone(TimmBackbone):
    """A timm ViT / EVA as a ``Backbone`` (see the module docstring); ``stage_blocks``: the dense-map blocks."""

    def __init__(
        self, model: nn.Module, *, name: str, spec: ViTSpec, input_size: int, stage_blocks: Sequence[int] | None
    ) -> None:
        depth = len(model.blocks)  # type: ignore[arg-type]
        quarters = [list(range(depth * q // 4, depth * (q + 1) // 4)) for q in range(4)]
        groups: GroupPrefixes = [("embed", ("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre"))]
        groups += [(f"blocks{q + 1}", tuple(f"blocks.{i}" for i in idx)) for q, idx in enumerate(quarters)]
        groups.append(("norm", ("norm", "fc_norm")))
        patch = int(model.patch_embed.patch_size[0])  # type: ignore[union-attr, index]
        head = NoGuidanceHead() if spec.clip or spec.pool == "cls_mean" else None
        super().__init__(
            model,
            name=name,
            mean=spec.mean,
            std=spec.std,
            input_size=input_size,
            groups=groups,
            output_stride=patch,
            head=head,
        )
        self.pool = spec.pool
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        if spec.pool == "cls_mean":
            self.feature_dim = 2 * int(model.embed_dim)  # type: ignore[arg-type]
        self.stage_blocks = tuple(stage_blocks) if stage_blocks else default_blocks(depth)
        if not all(0 <= b < depth for b in self.stage_blocks):
            from asg.errors import ConfigError

            raise ConfigError(f"model.vit_blocks={list(self.stage_blocks)}: {name} has blocks 0..{depth - 1}")
        width = int(model.embed_dim)  # type: ignore[arg-type]
        self.stage_channels = (width,) * len(self.stage_blocks)
        self._strides = (patch,) * len(self.stage_blocks)

    def forward_dense(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        final, inter = self.model.forward_intermediates(x, indices=list(self.stage_blocks), output_fmt="NCHW")  # type: ignore[operator]
        return list(inter), self.forward_head(final, pre_logits=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens [B, N, D] -> pooled [B, feature_dim] (see ``pool``), or the guidance logits [B, 1000]."""
        if self.pool == "cls_mean":
            x = _cls_mean(x, self.num_prefix_tokens)
        else:
            x = self.model.forward_head(x, pre_logits=True)  # type: ignore[operator]
        return x if pre_logits else self.imagenet_head(x)


def _cls_mean(tokens: Tensor, prefix: int) -> Tensor:
    """[B, N, D] -> [B, 2D]: class token concatenated with the mean of the patch tokens (registers excluded)."""
    import torch

    return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=1)


def vit(
    name: str,
    state: Mapping[str, Tensor] | None,
    source: str,
    *,
    input_size: int | None = None,
    stage_blocks: Sequence[int] | None = None,
    **kwargs: Any,
) -> TimmViTBackbone:
    """Build ViT backbone ``name`` (a key of ``VITS``) at ``input_size``; ``state``: native file (original DINOv2,
    open_clip/OpenAI CLIP, timm) through timm's converters, or own layout. ``kwargs`` go to ``timm.create_model``
    (e.g. a tiny ``depth``/``embed_dim``/``num_heads`` in tests)."""
    spec = VITS[name]
    size = input_size or spec.input_size
    own = state is not None and is_own_layout(state)
    args: dict[str, Any] = {
        "img_size": size,
        "dynamic_img_size": True,
        "dynamic_img_pad": True,
        "drop_path_rate": 0.0,
        "num_classes": 0,
    }
    args.update(spec.timm_args)
    timm_name = spec.timm_name
    if spec.family == "dinov3":  # the distilled ViTs' zero qkv biases, or a file that has real ones
        timm_name, state = qkv_bias_variant(timm_name, state)
    if spec.pool == "timm" and not spec.clip and not spec.family:
        args["num_classes"] = 1000  # EVA02 fine-tuned on ImageNet-1k: its own head guides
    model = create_timm(timm_name, None if own else state, source, **{**args, **kwargs})
    bb = TimmViTBackbone(model, name=name, spec=spec, input_size=size, stage_blocks=stage_blocks)
    if own and state is not None:
        bb.load_own(state, source)
    return bb
