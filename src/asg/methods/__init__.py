"""Training methods: each turns a batch into a loss (``METHODS`` maps names to classes; ``SelfTraining`` wraps one
of them for domain adaptation, see ``asg.adapt``). Baselines beside ASG: ``erm``, ``l2sp``, ``lpft`` and
``feature``; ``csg``, the authors' contrastive follow-up (``asg.methods.csg``); WiSE-FT acts after training
(``asg.methods.wise_ft``). See docs/methods.md."""

from __future__ import annotations

from asg.config import MethodConfig
from asg.errors import ConfigError
from asg.methods.asg import ASG
from asg.methods.base import (
    Batch,
    LossOutput,
    Method,
    MethodBase,
    TargetBatch,
    cross_entropy,
    kl_teacher_student,
    with_method_parameters,
)
from asg.methods.csg import CSG
from asg.methods.erm import ERM
from asg.methods.feature import FeatureGuidance, feature_distance
from asg.methods.l2sp import L2SP
from asg.methods.lpft import LPFT
from asg.methods.self_training import SelfTraining, model_regularizer

METHODS: dict[str, type[MethodBase]] = {
    "erm": ERM,
    "asg": ASG,
    "l2sp": L2SP,
    "lpft": LPFT,
    "feature": FeatureGuidance,
    "csg": CSG,
}


def build_method(cfg: MethodConfig) -> Method:
    if cfg.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {cfg.name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.name](cfg)


__all__ = [
    "METHODS",
    "Batch",
    "LossOutput",
    "Method",
    "SelfTraining",
    "TargetBatch",
    "build_method",
    "cross_entropy",
    "feature_distance",
    "kl_teacher_student",
    "model_regularizer",
    "with_method_parameters",
]
