"""Training methods: each contributes a loss and nothing else (``METHODS`` maps names to classes)."""

from __future__ import annotations

from asg.config import MethodConfig
from asg.errors import ConfigError
from asg.methods.asg import ASG
from asg.methods.base import LossOutput, Method, cross_entropy, kl_teacher_student
from asg.methods.erm import ERM
from asg.methods.l2sp import L2SP

METHODS: dict[str, type] = {"erm": ERM, "asg": ASG, "l2sp": L2SP}


def build_method(cfg: MethodConfig) -> Method:
    if cfg.name not in METHODS:
        raise ConfigError(f"method.name: unknown method {cfg.name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.name](cfg)


__all__ = ["METHODS", "build_method", "cross_entropy", "LossOutput", "Method", "kl_teacher_student"]
