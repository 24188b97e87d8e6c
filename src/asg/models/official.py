"""The official ASG release's trained files: its classifiers and FCN-8s (for ``model.init_from`` and ``asg
evaluate``) and its L2O policies (for ``l2o.policy``).

The layouts were learnt from how the public release (NVlabs/ASG) saves and loads these files, not from its code;
every file is read with ``torch.load(weights_only=True)`` (``asg.models.base.read_weight_file``).

**VisDA-17 classifier** (``res101_vista17_best.pth.tar``): ``{'epoch': int, 'state_dict': {...}, 'best_prec1':
float}``; the state dict of a torchvision ResNet wrapped in ``nn.DataParallel`` (keys ``module.conv1.weight`` ...),
whose ImageNet classifier ``fc`` (1000 classes) is kept and whose task head is ``fc_new = Sequential(Linear(2048,
512), ReLU, Linear(512, C))`` (keys ``fc_new.0.*``, ``fc_new.2.*``). Here that is ``ASGClassifier``: backbone
``model.*`` (timm's ResNet has torchvision's names), ``imagenet_head`` (= ``fc``) and ``head`` (= ``fc_new``).

**GTA5 FCN-8s VGG16** (``vgg16_segmentation_best.pth.tar``; the release's ``train_seg.py`` / ``l2o_train_seg.py``
save and resume it): ``{'epoch': int, 'state_dict': {...}, 'best_mIoU': float}``; the state dict of the release's
FCN-8s "at once" network, not wrapped in ``DataParallel`` (a ``module.`` prefix is stripped all the same), 39
tensors named after the Caffe layers: ``conv1_1`` ... ``conv5_3`` (13 VGG16 convolutions, ``weight`` and ``bias``;
conv1_1 with padding 100), ``fc6`` (Conv2d 512 -> 4096, 7x7), ``fc7`` (Conv2d 4096 -> 4096, 1x1), ``score_fr``,
``score_pool4``, ``score_pool3`` (1x1 convolutions to C classes, with bias) and ``upscore2``, ``upscore_pool4``,
``upscore8`` (ConvTranspose2d C -> C, kernels 4, 4, 16, no bias). No BatchNorm, no buffers. Here that is
``ASGSegmenter`` with ``segmenter: fcn8s`` on ``vgg16``: ``convX_Y`` -> ``backbone.features.{i}`` (torchvision's
indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), the rest -> ``head.<same name>``. The file has no ImageNet
classifier: the release's student has none (its KL runs the separate ImageNet VGG16's fc6-fc8 on the student's
pool5), so ``backbone.imagenet_head`` keeps what ``model.weights`` gave it (the ImageNet VGG16's, as in the release).

**L2O policy** (``policy_res101_vista17.pth``, ``policy_vgg16_segmentation.pth``): a plain state dict of tensors
(no container), loaded by the release into its freshly built policy with ``state.update(file)``, so the file may
hold only part of the names. The names and shapes are ``LRPolicy``'s (it was built to match): per statistic
i = 0..4 (task loss, KL, progress, last layer's weight mean, its std: the release's observation order)
``net.state_encoder.{i}.rnn.{weight_ih_l0 [80, 1], weight_hh_l0 [80, 20], bias_ih_l0 [80], bias_hh_l0 [80]}``
(an ``nn.LSTM(1, 20)``), per layer group g ``action_distribution.linear.{g}.{weight [11, 101], bias [11]}`` (on
the 5 LSTM outputs concatenated with group g's current scale, the 11 scales 0.0 ... 1.0), and
``critic.fc.{weight [1, G * 101], bias [1]}``; G = 7 in both releases (ResNet: conv1, bn1, layer1-4, fc_new;
FCN-8s: conv1-5, FC, fc_new). Assumed, as the release's saving code is not public: that the files hold all the
encoder and head tensors (required here); the critic (unused by REINFORCE and by this package) may be absent, and
then keeps its fresh initialisation, as it would in the release.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from asg.errors import WeightsError
from asg.models.base import check_fit, read_weight_file, strip_prefix
from asg.models.finite import check_finite


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


FCN8S_CONVS = {  # the release's VGG16 convolution names -> index in torchvision's ``vgg16().features``
    "conv1_1": 0,
    "conv1_2": 2,
    "conv2_1": 5,
    "conv2_2": 7,
    "conv3_1": 10,
    "conv3_2": 12,
    "conv3_3": 14,
    "conv4_1": 17,
    "conv4_2": 19,
    "conv4_3": 21,
    "conv5_1": 24,
    "conv5_2": 26,
    "conv5_3": 28,
}
FCN8S_HEAD = ("fc6", "fc7", "score_fr", "score_pool4", "score_pool3", "upscore2", "upscore_pool4", "upscore8")
IMAGENET_HEAD_PREFIX = "backbone.imagenet_head."


def official_fcn8s_to_own(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official FCN-8s VGG16 keys -> ``ASGSegmenter`` keys (``backbone.features.{i}.*``, ``head.*``); a key of
    neither kind is kept as it is (so the fit check reports it as unexpected)."""
    out = {}
    for key, value in strip_prefix(state, "module.").items():
        layer, _, param = key.partition(".")
        if layer in FCN8S_CONVS:
            out[f"backbone.features.{FCN8S_CONVS[layer]}.{param}"] = value
        elif layer in FCN8S_HEAD:
            out[f"head.{key}"] = value
        else:
            out[key] = value
    return out


def official_layout(state: Mapping[str, Tensor]) -> str:
    """``"classifier"`` (a ``fc_new`` task head), ``"fcn8s"`` (``score_fr``) or ``""`` (neither)."""
    keys = strip_prefix(state, "module.")
    if any(k.startswith("fc_new.") for k in keys):
        return "classifier"
    if "score_fr.weight" in keys and any(k.startswith("conv1_1.") for k in keys):
        return "fcn8s"
    return ""


def load_official_checkpoint(model: nn.Module, path: str | Path) -> str:
    """Load an official ASG file (VisDA-17 classifier or GTA5 FCN-8s) into ``model``; returns what was found (one
    line). WeightsError when the file is of another layout or another backbone / segmenter / number of classes."""
    obj = read_weight_file(path)
    if not (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)):
        raise WeightsError(
            f"{path}: not an official ASG checkpoint (no 'state_dict'); init_from takes a run folder, "
            "a .safetensors file of this package, or an official ASG .pth.tar"
        )
    raw = obj["state_dict"]
    check_finite(strip_prefix(raw, "module."), f"official ASG checkpoint {path}")
    layout = official_layout(raw)
    if layout == "fcn8s":
        return _load_fcn8s(model, path, obj, raw)
    if layout != "classifier":
        raise WeightsError(
            f"{path}: an official checkpoint with neither an 'fc_new' task head (VisDA-17 "
            "classifier) nor 'score_fr' and 'conv1_1' (GTA5 FCN-8s VGG16) is not supported"
        )
    state = official_to_own(raw)
    check_fit(model, state, f"{path} (official ASG layout) does not fit this model")
    model.load_state_dict(state, strict=False)
    classes = state["head.2.weight"].shape[0] if "head.2.weight" in state else "?"
    return (
        f"official ASG checkpoint {path}: epoch {obj.get('epoch')}, best_prec1 {obj.get('best_prec1')}, "
        f"{len(state)} tensors, task head fc_new with {classes} classes"
    )


def _load_fcn8s(model: nn.Module, path: str | Path, obj: Mapping[str, object], raw: Mapping[str, Tensor]) -> str:
    state = official_fcn8s_to_own(raw)
    own = model.state_dict()
    guidance = [k for k in own if k.startswith(IMAGENET_HEAD_PREFIX)]
    what = f"{path} (official ASG GTA5 FCN-8s VGG16 layout) does not fit this model (needs model.backbone=vgg16, "
    what += "model.segmenter=fcn8s and the file's number of classes)"
    check_fit(model, state, what, optional=guidance)
    model.load_state_dict(state, strict=False)
    classes = state["head.score_fr.weight"].shape[0]
    return (
        f"official ASG GTA5 FCN-8s VGG16 checkpoint {path}: epoch {obj.get('epoch')}, best_mIoU "
        f"{obj.get('best_mIoU')}, {len(state)} tensors, {classes} classes; the ImageNet guidance head (fc6-fc8, "
        "not in the file) stays as model.weights gave it"
    )


POLICY_PARTS = ("net.state_encoder.", "action_distribution.linear.", "critic.fc.")


def official_policy_state(obj: object, path: str | Path, own: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """The official L2O policy file's contents ``obj`` as a full ``LRPolicy`` state dict (``own``: the state dict
    of a freshly built policy of the file's group count, which supplies an absent critic), and what was found (one
    line). WeightsError naming ``path`` when it is not a state dict of the policy's names and shapes."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise WeightsError(f"{path} is not a state dict of tensors (an official ASG L2O policy file is one)")
    state = strip_prefix(obj, "module.")
    foreign = sorted(k for k in state if not k.startswith(POLICY_PARTS))
    if foreign:
        raise WeightsError(
            f"{path}: not an L2O policy file of the official ASG layout (unexpected "
            f"{len(foreign)}: {', '.join(foreign[:3])})"
        )
    missing = sorted(k for k in own if k not in state and not k.startswith("critic."))
    if missing:
        raise WeightsError(
            f"{path}: an L2O policy file without its LSTM encoders or action heads (missing "
            f"{len(missing)}: {', '.join(missing[:3])}) cannot be used"
        )
    critic = all(k in state for k in own if k.startswith("critic."))
    full = {**{k: v for k, v in own.items() if k.startswith("critic.")}, **state}  # an absent critic: fresh
    encoders = len({k.split(".")[2] for k in state if k.startswith("net.state_encoder.")})
    heads = len({k.split(".")[2] for k in state if k.startswith("action_distribution.linear.")})
    hidden = state["net.state_encoder.0.rnn.weight_hh_l0"].shape[1] if encoders else "?"
    return full, (
        f"official ASG L2O policy {path}: {encoders} LSTM encoders (hidden {hidden}), {heads} layer-group heads, "
        f"critic {'present' if critic else 'absent (fresh initialisation; unused)'}"
    )
