"""Guidance heads: the frozen 1000-class head that ASG's KL reads (``model.guidance_head``), for backbones with
and without an ImageNet classifier. The head is installed as ``backbone.imagenet_head``, so the student and the
teacher (a deep copy of the backbone, ``asg.models.classifier.Teacher``) share it and their logits agree before
any step: the KL starts at 0, as with a CNN's own head.

    imagenet       the backbone's own ImageNet classifier (EfficientNet-Lite, ResNet, ConvNeXt, EVA02-in1k, VGG16)
    dinov2_linear  DINOv2's released linear head (``dinov2_vit?14_linear_head.pth``: ``weight`` [1000, 2D],
                   ``bias``) on the normed class token concatenated with the mean normed patch token
    linear         a linear ImageNet head in the same layout (``weight`` [1000, D], ``bias`` [1000]) on the
                   backbone's pooled features, e.g. one the user trained for DINOv3 (no head is released below
                   ViT-7B; DINOv3 pools the normed class token, D = width)
    clip_zeroshot  CLIP's zero-shot ImageNet classifier: ``100 * normalize(x @ proj) @ T`` with T [E, 1000] the
                   normalised mean text embedding of each class name over prompt templates, computed once with the
                   frozen text tower (open_clip ``build_zero_shot_classifier``) and cached on disk
    none           no head (``[B, 0]`` logits): for ``method=feature`` (feature guidance) or ``erm``
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asg.errors import ConfigError, WeightsError
from asg.io import atomic_write
from asg.models.base import Backbone, NoGuidanceHead, load_state_dict_file, local_weights_file, read_weight_file

GUIDANCE_HEADS = ("imagenet", "dinov2_linear", "linear", "clip_zeroshot", "none")
TEMPLATES = ("openai", "simple")  # open_clip's 80 OpenAI ImageNet prompts, or its 7 "simple" ones


class ClipZeroShotHead(nn.Module):
    """``[B, D] -> [B, 1000]``: ``logit_scale * normalize(proj(x)) @ classifier``; frozen buffers.

    ``proj``: CLIP's image projection [D, E] (``visual.proj``); ``classifier``: [E, 1000] normalised text
    embeddings; ``logit_scale``: CLIP's learnt temperature, exp'd (100 for OpenAI CLIP).
    """

    proj: Tensor
    classifier: Tensor
    logit_scale: Tensor

    def __init__(self, proj: Tensor, classifier: Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("proj", proj.detach().float().clone())
        self.register_buffer("classifier", classifier.detach().float().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(x @ self.proj.to(x.dtype), dim=-1)
        return self.logit_scale * (z @ self.classifier.to(z.dtype))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in index order (from ``asg/resources/imagenet_classes.txt``)."""
    text = resources.files("asg").joinpath("resources/imagenet_classes.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def attach_guidance_head(
    backbone: Backbone, kind: str, *, file: str | None = None, clip: dict[str, Any] | None = None
) -> None:
    """Install the guidance head ``kind`` (one of ``GUIDANCE_HEADS``) as ``backbone.imagenet_head``, frozen.

    ``file``: the DINOv2 linear-head file, or the open_clip weight file (the backbone's ``model.weights``).
    ``clip``: ``{"model": open_clip config name or .json path, "templates": "openai"|"simple", "cache_dir": ...}``.
    """
    if kind not in GUIDANCE_HEADS:
        raise ConfigError(f"model.guidance_head={kind!r}: choose one of {', '.join(GUIDANCE_HEADS)}")
    name = getattr(backbone, "name", type(backbone).__name__)
    if kind == "imagenet":
        if isinstance(backbone.imagenet_head, NoGuidanceHead):
            raise ConfigError(
                f"model.guidance_head=imagenet: backbone {name} has no ImageNet head; use dinov2_linear (DINOv2), "
                "clip_zeroshot (CLIP), or none with method=feature"
            )
        return
    if kind == "none":
        backbone.imagenet_head = NoGuidanceHead()
    elif kind in ("dinov2_linear", "linear"):
        what = (
            "a linear head file (weight [1000, D], bias [1000])"
            if kind == "linear"
            else "dinov2_vit?14_linear_head.pth"
        )
        if file is None:
            raise ConfigError(f"model.guidance_head={kind} needs model.guidance_file ({what})")
        where = (
            "https://dl.fbaipublicfiles.com/dinov2/ (e.g. dinov2_vitb14/dinov2_vitb14_linear_head.pth)"
            if kind == "dinov2_linear"
            else "a linear classifier you trained on ImageNet over this backbone's pooled features"
        )
        path = local_weights_file(file, "DINOv2 linear head" if kind == "dinov2_linear" else "linear head", where)
        state = load_state_dict_file(path)
        head = nn.Linear(backbone.feature_dim, 1000)
        if set(state) != {"weight", "bias"} or tuple(state["weight"].shape) != tuple(head.weight.shape):
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            raise WeightsError(
                f"{path} is not a {'DINOv2 ' if kind == 'dinov2_linear' else ''}linear head for {name} (expected "
                f"weight {tuple(head.weight.shape)} and bias; found {shapes})"
            )
        head.load_state_dict(state)
        backbone.imagenet_head = head
    else:  # clip_zeroshot
        if file is None or not Path(file).is_file():
            raise WeightsError(
                f"model.guidance_head=clip_zeroshot reads the text tower from the open_clip weight "
                f"file (model.weights): {file!r} is not a file"
            )
        opts = clip or {}
        backbone.imagenet_head = clip_zeroshot_head(
            file, opts.get("model", ""), opts.get("templates", "openai"), opts.get("cache_dir")
        )
    backbone.imagenet_head.requires_grad_(False)


def _cache_dir(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "asg" / "clip_zeroshot"


def clip_zeroshot_head(
    file: str,
    clip_model: str,
    templates: str = "openai",
    cache_dir: str | None = None,
    names: list[str] | None = None,
) -> ClipZeroShotHead:
    """The CLIP zero-shot head of open_clip weight ``file`` (config ``clip_model``: an open_clip name such as
    ``ViT-B-16-quickgelu`` or a .json file with ``embed_dim``, ``vision_cfg``, ``text_cfg``) over the class
    ``names`` (default: the 1000 ImageNet classes; a dataset's class names give its zero-shot classifier).

    The text side is computed once and cached under ``cache_dir`` (default ``$XDG_CACHE_HOME/asg/clip_zeroshot``),
    keyed by the file's path, size and mtime, the config, the templates and the class names.
    """
    if templates not in TEMPLATES:
        raise ConfigError(f"model.clip_templates={templates!r}: choose one of {', '.join(TEMPLATES)}")
    path = Path(file).expanduser().resolve()
    names = imagenet_class_names() if names is None else list(names)
    st = path.stat()
    key = json.dumps([str(path), st.st_size, st.st_mtime_ns, clip_model, templates, names])
    cached = _cache_dir(cache_dir) / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")
    if cached.is_file():
        from safetensors.torch import load_file

        t = load_file(str(cached))
        return ClipZeroShotHead(t["proj"], t["classifier"], float(t["logit_scale"]))
    proj, classifier, scale = _compute_zeroshot(path, clip_model, templates, names)
    from safetensors.torch import save_file

    tensors = {"proj": proj, "classifier": classifier, "logit_scale": torch.tensor(scale)}
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(cached, lambda tmp: save_file(state, tmp))
    return ClipZeroShotHead(proj, classifier, scale)


def _compute_zeroshot(path: Path, clip_model: str, templates: str, names: list[str]) -> tuple[Tensor, Tensor, float]:
    try:
        import open_clip
    except ImportError:
        raise ConfigError("model.guidance_head=clip_zeroshot needs open_clip: pip install 'asg[clip]'") from None
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if clip_model.endswith(".json"):
        cfg = json.loads(Path(clip_model).read_text())
        tokenizer_name = cfg.pop("tokenizer", "ViT-B-16")
    else:
        cfg = open_clip.get_model_config(clip_model)
        if cfg is None:
            raise ConfigError(f"model.clip_model={clip_model!r} is no open_clip config")
        tokenizer_name = clip_model
    quick_gelu = bool(cfg.pop("quick_gelu", clip_model.endswith("quickgelu") or clip_model.endswith(".json")))
    model = open_clip.model.CLIP(**cfg, quick_gelu=quick_gelu)
    obj = read_weight_file(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds no open_clip state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise WeightsError(f"{path} does not fit open_clip model {clip_model}: {detail}") from None
    model.eval()
    prompts = OPENAI_IMAGENET_TEMPLATES if templates == "openai" else SIMPLE_IMAGENET_TEMPLATES
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model, open_clip.get_tokenizer(tokenizer_name), names, prompts, num_classes_per_batch=50
        )
    proj = model.visual.proj
    assert isinstance(proj, Tensor)
    return proj.detach().float(), classifier.float(), float(model.logit_scale.detach().exp())
