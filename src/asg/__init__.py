"""ASG: automated synthetic-to-real generalization (proxy guidance + learned layer-wise learning rates).

The Python API mirrors the CLI: ``asg.load_config``, ``asg.train``, ``asg.evaluate``, ``asg.run_demo``;
``asg.load(run)`` returns a ``Predictor`` for one's own images.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "load_config": "asg.config",
    "train": "asg.api",
    "evaluate": "asg.api",
    "load": "asg.api",
    "run_demo": "asg.demo",
    "meta_train": "asg.l2o.meta",
    "sweep": "asg.tuning",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'asg' has no attribute {name!r}")


__all__ = ["__version__", *_API]
