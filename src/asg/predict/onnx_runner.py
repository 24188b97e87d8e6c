"""An exported ``.onnx`` model run by onnxruntime behind the ``ModelOutput`` contract, so ``Predictor`` applies the
evaluation's inference code (sliding windows, flip, scales) to it unchanged. The network runs in onnxruntime; the
pre- and post-processing in numpy and torch tensors on the CPU.

The sidecar ``<file>.onnx.json`` must be there and unaltered: it holds the class names and input geometry, and the
checksums of the ONNX file and of itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from asg.engine.rundir.model_info import ModelInfo
from asg.errors import AsgError
from asg.io import sha256_file
from asg.models.base import ModelOutput
from asg.predict.export import SIDECAR_FORMAT, sidecar_checksum, sidecar_path


class OnnxModel(nn.Module):
    """onnxruntime session of an exported model: ``forward(x [B, 3, H, W] in [0, 1]) -> ModelOutput`` (logits only;
    ``imagenet_logits`` and ``features`` are empty [B, 0])."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, x: Tensor) -> ModelOutput:
        logits = self.session.run(None, {"image": x.detach().float().cpu().contiguous().numpy()})[0]
        out = torch.from_numpy(logits)
        empty = out.new_zeros(out.shape[0], 0)
        return ModelOutput(out, empty, empty)


def read_sidecar(path: Path) -> dict[str, Any]:
    """The checked sidecar of the ONNX file ``path``; AsgError when it is missing, unreadable or altered, or when
    the ONNX file is not the one it describes."""
    side_path = sidecar_path(path)
    if not side_path.is_file():
        raise AsgError(
            f"{path}: its sidecar {side_path.name} is missing (it holds the class names and input size): "
            "copy it beside the model or export again with `asg export`"
        )
    try:
        side = json.loads(side_path.read_text())
    except (OSError, ValueError) as exc:
        raise AsgError(f"cannot read the sidecar {side_path}: {exc}") from None
    if not isinstance(side, dict) or side.get("format") != SIDECAR_FORMAT:
        raise AsgError(f"{side_path} is not an asg ONNX sidecar (format {SIDECAR_FORMAT} expected)")
    if side.get("sidecar_sha256") != sidecar_checksum(side):
        raise AsgError(f"{side_path} was altered after export (its checksum does not match): export again")
    if side.get("onnx_sha256") != sha256_file(path):
        raise AsgError(
            f"{path} does not match the checksum in {side_path.name} (altered, or another export's file): export again"
        )
    return side


def load_onnx(path: str | Path, threads: int | None = None) -> tuple[OnnxModel, ModelInfo, dict[str, Any]]:
    """(model, info, sidecar) of an exported ONNX file. A model exported at a fixed size segments in sliding
    windows of that size."""
    path = Path(path)
    if not path.is_file():
        raise AsgError(f"{path} does not exist")
    side = read_sidecar(path)
    try:
        model = OnnxModel(path, threads)
    except ImportError:
        raise AsgError("predicting with a .onnx file needs onnxruntime: pip install 'asg[export]'") from None
    except Exception as exc:
        raise AsgError(f"onnxruntime cannot load {path}: {' '.join(str(exc).split())[:200]}") from None
    info = ModelInfo.from_dict(side)
    if info.per_pixel and not side["input"].get("dynamic_size", True):
        info.sliding_window = list(side["input"]["size"])
        info.eval_resize = None
    return model, info, side
