"""DINOv3 backbones (Siméoni et al., 2025) through timm (>= 1.0.20): where their weights come from and how a file
is read.

ViTs (``dinov3_vit{s16,s16plus,b16,l16,h16plus}``, timm ``vit_*_patch16_dinov3``, an ``Eva`` with RoPE, 4 register
tokens and layer scale): pooled as upstream, by the normed class token (timm's ``global_pool='token'``; timm's
default is the patch mean); any input size (rotary position embeddings are computed for the grid of each input,
there is no position table to resample); the segmentation pyramid of the other ViTs (4 blocks' patch tokens at
stride 16 -> ViTDet's simple pyramid -> FPN); LoRA on the same ``attn.qkv``, ``attn.proj``, ``mlp.fc1``,
``mlp.fc2`` layers. ConvNeXts (``convnext_{tiny,small,base,large}_dinov3``): timm's ConvNeXt with DINOv3's weights,
no classifier.

No ImageNet classifier exists below ViT-7B, so guidance is by features (``method=feature``), by CSG (``method=csg``)
or by a linear ImageNet head the user trained on the pooled features (``model.guidance_head=linear`` with
``model.guidance_file``: ``weight`` [1000, D] and ``bias`` [1000], DINOv2's linear-head layout).

Weights are gated under Meta's DINOv3 License and are only ever read from a local file (``model.weights=PATH``):
Meta's ``dinov3_<arch>_pretrain_lvd1689m-<hash>.pth`` (original layout: ``storage_tokens``, ``blocks.N.ls1.gamma``,
``blocks.N.attn.qkv.bias`` with its ``bias_mask``, ``rope_embed.periods``, ``mask_token``; timm's converter maps it)
or timm's ``model.safetensors``. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

LICENCE = "Meta's DINOv3 License (gated: accept it first)"
WHERE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
HF = "https://huggingface.co/timm/"

# own name -> (timm architecture, Meta's file stem)
VITS = {
    "dinov3_vits16": ("vit_small_patch16_dinov3", "dinov3_vits16"),
    "dinov3_vits16plus": ("vit_small_plus_patch16_dinov3", "dinov3_vits16plus"),
    "dinov3_vitb16": ("vit_base_patch16_dinov3", "dinov3_vitb16"),
    "dinov3_vitl16": ("vit_large_patch16_dinov3", "dinov3_vitl16"),
    "dinov3_vith16plus": ("vit_huge_plus_patch16_dinov3", "dinov3_vith16plus"),
}
CONVNEXTS = {
    f"convnext_{size}_dinov3": (f"convnext_{size}", f"dinov3_convnext_{size}")
    for size in ("tiny", "small", "base", "large")
}


def file_help(name: str) -> str:
    """Which file backbone ``name`` reads, under which licence, and where it is obtained (for error messages)."""
    timm_name, stem = {**VITS, **CONVNEXTS}[name]
    return (
        f"it reads {stem}_pretrain_lvd1689m-<hash>.pth (Meta's layout) or the model.safetensors of "
        f"{HF}{timm_name}.lvd1689m (timm's layout), under {LICENCE}, from {WHERE} or that Hugging Face page; "
        "pass model.weights=PATH"
    )


def qkv_bias_variant(timm_name: str, state: Mapping[str, Tensor] | None) -> tuple[str, Mapping[str, Tensor] | None]:
    """timm's architecture for ``state`` and the state to give its converter.

    The distilled ViTs carry a ``qkv.bias`` whose entries are zero (timm's ``vit_*_dinov3`` has none); a file with
    non-zero query/value biases, or timm-layout keys ``q_bias`` (own layout ``model.blocks.0.attn.q_bias``), needs
    the ``_qkvb`` architecture. Zero biases are dropped before timm's converter sees them.
    """
    if state is None:
        return timm_name, state
    keys = set(state)
    if any(k.endswith("blocks.0.attn.q_bias") for k in keys):
        return timm_name + "_qkvb", state
    biases = [k for k in keys if k.endswith(".attn.qkv.bias")]
    if not biases:
        return timm_name, state
    if any(
        bool(state[k].chunk(3, dim=-1)[0].abs().max() > 0 or state[k].chunk(3, dim=-1)[2].abs().max() > 0)
        for k in biases
    ):
        return timm_name + "_qkvb", state
    return timm_name, {k: v for k, v in state.items() if k not in biases}
