"""What a loaded ``Config`` must satisfy: allowed values (``_CHOICES``), ranges (``_RANGES``), and a few
cross-field rules. ``validate`` raises one ``ConfigError`` naming the key.

A config is read here by its dotted keys alone, so this module imports nothing of ``asg`` but its errors (and
``asg.config`` imports it). The names of the registries (datasets, methods, backbones...) are checked where
things are built: ``asg.registries``."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from asg.errors import ConfigError

_CHOICES = {
    "optim.sgd": ("torch", "lr_in_momentum"),
    "optim.optimizer": ("sgd", "adamw"),
    "optim.schedule": ("warmup_poly_floor", "warmup_poly", "constant"),
    "optim.bn_mode": ("frozen", "train"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "l2o.window_rule": ("intended", "released"),
    "data.on_bad_image": ("error", "skip"),
    "data.split": ("train", "all", "val"),
    "data.class_set": (19, 16, 13),
    "model.clip_templates": ("openai", "simple"),
    "model.init_checkpoint": ("last", "source-val", "oracle"),
    "teacher.cache_storage": ("memory", "fp32", "fp16", "topk"),
    "method.feature_distance": ("cosine", "mse"),
    "method.csg_augment": ("auto", "randaugment", "jitter", "none"),
    "teacher.cache_key": ("auto", "stat", "content"),
    "data.real_split": ("all", "halves"),
    "adapt.thresholds": ("class_balanced", "global"),
    "adapt.regularizer": ("none", "mrkld", "mrent"),
}

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")  # the accepted values of train.device

_POSITIVE = (lambda v: v > 0, "positive")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")

# key -> (check, what the value must be); a value of None ("off" / "not set") is not checked
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(
        (
            "train.steps",
            "train.eval_every",
            "train.checkpoint_every",
            "train.log_every",
            "data.batch_size",
            "data.eval_batch_size",
            "data.image_size",
            "data.num_train",
            "data.eval_max_per_set",
            "optim.lr",
            "optim.max_grad_norm",
            "method.kl_cap",
            "l2o.episodes",
            "l2o.episode_steps",
            "l2o.num_steps",
            "adapt.rounds",
            "adapt.steps_per_round",
            "adapt.target_batch_size",
            "teacher.cache_topk",
        ),
        _POSITIVE,
    ),
    **dict.fromkeys(
        (
            "data.num_workers",
            "optim.weight_decay",
            "optim.backbone_lr_mult",
            "optim.warmup_steps",
            "method.kl_weight",
            "method.l2sp_alpha",
            "method.probe_steps",
            "method.feature_weight",
            "model.hidden_dim",
            "adapt.portion_step",
            "adapt.target_weight",
            "adapt.reg_weight",
        ),
        _NON_NEGATIVE,
    ),
    **dict.fromkeys(("adapt.init_portion", "adapt.max_portion"), (lambda v: 0 < v <= 1, "in (0, 1]")),
    "adapt.ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.source_val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.floor_at": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.loss_explosion_factor": (lambda v: v > 1, "> 1 (or null to turn the check off)"),
    "model.output_stride": (lambda v: v in (8, 16, 32), "8, 16 or 32"),
    **dict.fromkeys(("method.csg_dim", "method.csg_queue", "method.csg_temperature", "method.csg_chunks"), _POSITIVE),
    "method.csg_weight": _NON_NEGATIVE,
    "method.csg_momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "method.csg_jitter": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "method.csg_stages": (lambda v: len(v) >= 1 and len(set(v)) == len(v), "a list of distinct stage indices"),
    "method.csg_randaugment": (lambda v: len(v) == 2 and v[0] >= 1 and 0 <= v[1] <= 30, "[N >= 1, M in 0..30]"),
    **dict.fromkeys(
        ("data.train_resize", "data.crop_size", "data.eval_resize", "eval.sliding_window", "eval.sliding_stride"),
        (lambda v: len(v) == 2 and all(int(n) > 0 for n in v), "[height, width] of positive integers"),
    ),
    "data.scale_range": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[low, high] with 0 < low <= high"),
}


def _get(cfg: object, key: str) -> Any:
    """The value of a dotted config key of an ``asg.config.Config``, e.g. ``optim.lr``."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: object) -> None:
    """Check choice fields and ranges (tables ``_CHOICES`` and ``_RANGES``) and the cross-field rules of an
    ``asg.config.Config``; raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    for key, (check, must) in _RANGES.items():
        value = _get(cfg, key)
        if value is not None and not check(value):
            raise ConfigError(f"{key} must be {must}, got {value!r} (fix the recipe or pass --set {key}=VALUE)")
    device = _get(cfg, "train.device")
    if not DEVICE_PATTERN.fullmatch(device):
        raise ConfigError(f"train.device: {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    if _get(cfg, "l2o.controller") == "l2o" and not _get(cfg, "l2o.policy"):
        raise ConfigError("l2o.controller=l2o needs l2o.policy=PATH (a policy from `asg l2o train`)")
    init_portion, max_portion = _get(cfg, "adapt.init_portion"), _get(cfg, "adapt.max_portion")
    if max_portion < init_portion:
        raise ConfigError(f"adapt.max_portion ({max_portion}) is below adapt.init_portion ({init_portion})")
