"""The official ASG release's trained classifiers, for ``model.init_from`` and ``asg evaluate``.

Layout (learnt from how the public release saves and loads its models, not from its code): a ``torch.save`` of
``{'epoch': int, 'state_dict': {...}, 'best_prec1': float}``; the state dict of a torchvision ResNet wrapped in
``nn.DataParallel`` (keys ``module.conv1.weight`` ...), whose ImageNet classifier ``fc`` (1000 classes) is kept and
whose task head is ``fc_new = Sequential(Linear(2048, 512), ReLU, Linear(512, C))`` (keys ``fc_new.0.*``,
``fc_new.2.*``). Here that is ``ASGClassifier``: backbone ``model.*`` (timm's ResNet has torchvision's names),
``imagenet_head`` (= ``fc``) and ``head`` (= ``fc_new``). Read with ``torch.load(weights_only=True)``.

Not handled yet: the GTA5 FCN-8s VGG16 file and the L2O policy files (see the issue note).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from asg.errors import WeightsError
from asg.models.base import check_fit, read_weight_file, strip_prefix


def official_to_own(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official ResNet classifier keys -> ``ASGClassifier`` keys (``backbone.model.*``, ``backbone.imagenet_head.*``,
    ``head.*``)."""
    out = {}
    for key, value in strip_prefix(state, "module.").items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("fc_new."):
            out["head." + key[len("fc_new.") :]] = value
        elif key.startswith("fc."):
            out["backbone.imagenet_head." + key[3:]] = value
        else:
            out["backbone.model." + key] = value
    return out


def load_official_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Load an official ASG classifier file into ``model``; returns what was found (one line). WeightsError when
    the file is of another layout or another backbone / number of classes."""
    obj = read_weight_file(path)
    if not (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)):
        raise WeightsError(f"{path}: not an official ASG checkpoint (no 'state_dict'); init_from takes a run folder, "
                           "a .safetensors file of this package, or an official ASG .pth.tar")  # fmt: skip
    raw = obj["state_dict"]
    if not any(k.split(".", 1)[-1].startswith("fc_new.") or k.startswith("fc_new.") for k in raw):
        raise WeightsError(f"{path}: an official checkpoint without an 'fc_new' task head is not supported yet")
    state = official_to_own(raw)
    check_fit(model, state, f"{path} (official ASG layout) does not fit this model")
    model.load_state_dict(state, strict=False)
    classes = state["head.2.weight"].shape[0] if "head.2.weight" in state else "?"
    return (
        f"official ASG checkpoint {path}: epoch {obj.get('epoch')}, best_prec1 {obj.get('best_prec1')}, "
        f"{len(state)} tensors, task head fc_new with {classes} classes"
    )
