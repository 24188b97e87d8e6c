"""FCN-8s on VGG16 (the one hand-written backbone left) computes what it computed before the timm change.

Builds the FCN-8s segmenter with seeded random weights, non-zero score layers and fixed inputs, and prints a
digest of its outputs (task logits, ImageNet logits, pooled features). Run it on two checkouts and compare:
``PYTHONPATH=<checkout>/src python benchmarks/check_fcn8s_unchanged.py``.
"""

from __future__ import annotations

import hashlib

import torch

from asg.config import ModelConfig
from asg.models import build_model


def main() -> None:
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(backbone="vgg16", weights="none", segmenter="fcn8s", channels_last=False), 5, task="segmentation"
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("head.score"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.01)
        x = torch.rand(2, 3, 61, 83, generator=torch.Generator().manual_seed(1))
        out = model(x)
    for field in ("logits", "imagenet_logits", "features"):
        t = getattr(out, field).contiguous()
        digest = hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
        print(f"{field:16s} {tuple(t.shape)} sum {t.double().sum().item():.6f} sha256 {digest}")


if __name__ == "__main__":
    main()
