"""Parameter-efficient fine-tuning with peft: LoRA adapters injected into a timm backbone in place.

``apply_lora`` injects rank-``r`` adapters (``peft.inject_adapter_in_model``, no wrapper model) into the named
linear layers of the chosen blocks and freezes every other backbone parameter. The adapters' parameters are
named after the layer they adapt (``model.blocks.3.attn.qkv.lora_A.default.weight``), so they fall into that
block's layer group and L2O and per-group learning rates act on them as on full fine-tuning. ``lora_B`` starts at
zero: the adapted network computes exactly the pretrained one before the first step (the KL starts at 0).
The adapted layers' own weights move to ``<layer>.base_layer.weight``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from asg.errors import ConfigError
from asg.models.base import Backbone


def apply_lora(
    backbone: Backbone, rank: int, alpha: int, targets: Sequence[str], blocks: Sequence[int] | None = None
) -> list[str]:
    """Inject LoRA into ``backbone.model.blocks.<i>.<target>`` for i in ``blocks`` (None: all) and freeze the
    rest of the backbone; returns the adapted module names. ConfigError if nothing matches."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("model.lora_rank > 0 needs peft: pip install 'asg[lora]'") from None

    from asg.models.timm_backbone import lora_target_pattern

    model = getattr(backbone, "model", None)
    if model is None or not hasattr(model, "blocks"):
        raise ConfigError(f"model.lora_rank: LoRA needs a timm transformer backbone, not {type(backbone).__name__}")
    depth = len(model.blocks)
    chosen = list(range(depth)) if blocks is None else list(blocks)
    if not chosen or not all(0 <= b < depth for b in chosen):
        raise ConfigError(f"model.lora_blocks={chosen}: the backbone has blocks 0..{depth - 1}")
    pattern = lora_target_pattern(chosen, targets)
    import re

    matched = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, n)]
    if not matched:
        raise ConfigError(f"model.lora_targets={list(targets)} match no linear layer of blocks {chosen}")
    for p in backbone.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    backbone.imagenet_head.requires_grad_(False)
    return matched
