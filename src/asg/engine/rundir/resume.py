"""What ``--resume`` may change: settings that are applied from the restored step on, and those it refuses.

A resumed run uses the config given now (the saved ``config.yaml`` plus ``--set`` overrides) and rewrites
``config.yaml``, so the folder never records a value that is not used. Settings that would make the run a
different experiment (model, data, method, seed, batch, controller) are refused with a message.
"""

from __future__ import annotations

from typing import Any

from asg.config import Config, config_to_dict
from asg.errors import ConfigError

# dotted keys (or section prefixes ending in ".") that a resumed run applies from the restored step on
APPLIED_ON_RESUME = (
    "name",
    "optim.lr",
    "optim.backbone_lr_mult",
    "optim.momentum",
    "optim.weight_decay",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.poly_power",
    "optim.floor_at",
    "optim.max_grad_norm",
    "optim.bn_mode",
    "method.kl_weight",
    "method.l2sp_alpha",
    "method.kl_cap",
    "method.csg_weight",  # CSG's weight, as ASG's lambda (its queue, MLPs and stages are refused: the state's shape)
    "train.steps",
    "train.eval_every",
    "train.checkpoint_every",
    "train.log_every",
    "train.device",
    "train.precision",
    "train.compile",
    "train.compile_backend",
    "train.progress",
    "train.loss_explosion_factor",
    "data.root",  # the data moved; it must be the same data
    "data.train_list",
    "data.eval_lists",
    "data.num_workers",
    "data.eval_batch_size",
    "data.eval_max_per_set",
    "data.on_bad_image",
    "model.weights",  # read to build the model; its bytes must be the recorded ones (asg.models.base_weights)
    "eval.",
)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "eval_lists":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: Config, now: Config) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, new value)}`` for every field that differs."""
    a, b = _flatten(config_to_dict(saved)), _flatten(config_to_dict(now))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_changes(saved: Config, now: Config, step: int) -> dict[str, tuple[Any, Any]]:
    """The changes a resume at ``step`` applies; ConfigError for one it cannot apply."""
    changes = config_changes(saved, now)
    for key, (old, new) in changes.items():
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in APPLIED_ON_RESUME):
            raise ConfigError(
                f"cannot resume with {key} changed ({old!r} -> {new!r}): it would make the run a different "
                "experiment; start a new run in another --out instead"
            )
    if "train.steps" in changes:
        if now.train.steps <= step:
            raise ConfigError(f"cannot resume with train.steps={now.train.steps}: the run is already at step {step}")
        if now.l2o.controller != "fixed":
            raise ConfigError(
                f"cannot resume with train.steps changed under l2o.controller={now.l2o.controller}: its window "
                "schedule was planned for the original length; start a new run instead"
            )
    return changes
