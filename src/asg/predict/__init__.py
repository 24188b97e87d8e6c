"""Inference without the training data: ``asg predict`` (a person's images -> classes or masks) and ``asg export``
(the task model as ONNX with a JSON sidecar). ``asg.load(run)`` returns a :class:`Predictor`.

Modules: :mod:`~asg.predict.inputs` (what is read), :mod:`~asg.predict.loading` (the model without its data),
:mod:`~asg.predict.predictor`, :mod:`~asg.predict.writers`, :mod:`~asg.predict.run` (one ``asg predict``),
:mod:`~asg.predict.export` and :mod:`~asg.predict.onnx_runner`, :mod:`~asg.predict.cli` (the two commands).
Names are imported lazily, so the CLI's parser does not import torch.
"""

from __future__ import annotations

from typing import Any

_NAMES = {
    "ClassPrediction": "asg.predict.predictor",
    "MaskPrediction": "asg.predict.predictor",
    "Predictor": "asg.predict.predictor",
    "load_predictor": "asg.predict.run",
    "predict_files": "asg.predict.run",
    "export_run": "asg.predict.export",
}


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'asg.predict' has no attribute {name!r}")


__all__ = list(_NAMES)
