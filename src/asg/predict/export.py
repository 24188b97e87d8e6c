"""``asg export``: the task model of a run (no ImageNet head, no teacher; LoRA merged; BatchNorm folded) as an ONNX
file with a JSON sidecar, checked against PyTorch with onnxruntime before it is kept.

The graph takes ``image`` [B, 3, H, W] RGB in [0, 1] (the normalisation is inside) and returns ``logits`` [B, C]
(classification) or [B, C, H, W] at the input size (segmentation). The batch is dynamic; height and width too,
except for ViTs (their position embeddings fix the grid) or where the check at a second size fails.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from asg.config import config_to_dict
from asg.engine.rundir.model_info import ModelInfo
from asg.errors import AsgError
from asg.io import atomic_write_text, sha256_file
from asg.models.backbones import BACKBONES_VIT
from asg.models.fusion import inference_copy

SIDECAR_FORMAT = "asg-onnx/1"
DEFAULT_TOLERANCE = 1e-3


class TaskLogits(nn.Module):
    """``model``'s task logits alone: x [B, 3, H, W] in [0, 1] -> [B, C] or [B, C, H, W]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).logits


def merge_lora(model: nn.Module) -> int:
    """Merge peft LoRA adapters into their base layers in place; returns how many were merged."""
    merged = 0
    for module in model.modules():
        if type(module).__module__.startswith("peft.") and hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()  # type: ignore[operator]
            merged += 1
    return merged


def input_size(info: ModelInfo) -> tuple[int, int]:
    """(h, w) of the example input: the training size (classification) or the sliding window, ``eval_resize``,
    else the training size (segmentation)."""
    if info.per_pixel:
        size = info.sliding_window or info.eval_resize
        if size:
            return int(size[0]), int(size[1])
    return info.image_size, info.image_size


def sidecar_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".json")


def sidecar_checksum(side: dict[str, Any]) -> str:
    """SHA-256 of a sidecar's content without its own ``sidecar_sha256`` field."""
    body = {k: v for k, v in side.items() if k != "sidecar_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _export(module: nn.Module, x: Tensor, path: Path, dynamic_size: bool, per_pixel: bool, opset: int) -> None:
    axes: dict[str, dict[int, str]] = {"image": {0: "batch"}, "logits": {0: "batch"}}
    if dynamic_size:
        axes["image"].update({2: "height", 3: "width"})
        if per_pixel:
            axes["logits"].update({2: "height", 3: "width"})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes turned into constants; the check decides
        torch.onnx.export(
            module,
            (x,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )


def check_onnx(reference: nn.Module, path: Path, inputs: list[Tensor]) -> float:
    """Largest |logit difference| between ``reference`` (PyTorch) and onnxruntime on ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            want = reference(x).logits.float().numpy()
            got = session.run(None, {"image": x.numpy()})[0]
            if got.shape != want.shape:
                raise AsgError(f"onnxruntime gives logits of shape {list(got.shape)}, PyTorch {list(want.shape)}")
            worst = max(worst, float(np.max(np.abs(got - want))))
    return worst


def export_onnx(
    model: nn.Module,
    info: ModelInfo,
    path: Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = 17,
    fuse_bn: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``model`` (an ASG network, eval mode) to ``path`` with its sidecar ``path.json``; returns the sidecar.

    Checked on random inputs (two images at the export size; one at a second size when the size is dynamic);
    AsgError, and no file kept, when the largest logit difference exceeds ``tolerance``.
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise AsgError("asg export needs onnx and onnxruntime: pip install 'asg[export]'") from None
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
    export_copy = inference_copy(model) if fuse_bn else model
    lora = merge_lora(export_copy)
    h, w = input_size(info)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, h, w, generator=g)
    second = torch.rand(1, 3, h + 32, w + 48, generator=g)
    dynamic = info.backbone not in BACKBONES_VIT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    module = TaskLogits(export_copy).eval()
    try:
        _export(module, x, tmp, dynamic, info.per_pixel, opset)
        checked = [x, second] if dynamic else [x]
        try:
            diff = check_onnx(model, tmp, checked)
        except Exception:
            if not dynamic:
                raise
            dynamic, checked = False, [x]  # the graph fixed a size somewhere: export at the one size
            _export(module, x, tmp, dynamic, info.per_pixel, opset)
            diff = check_onnx(model, tmp, checked)
        if not diff <= tolerance:
            raise AsgError(
                f"the ONNX model differs from PyTorch by up to {diff:.3g} in the logits (tolerance "
                f"{tolerance:g}); not written"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    side: dict[str, Any] = {
        "format": SIDECAR_FORMAT,
        "onnx_file": path.name,
        "onnx_sha256": sha256_file(path),
        **info.to_dict(),
        "input": {
            "name": "image",
            "layout": "NCHW",
            "colour": "RGB",
            "range": [0.0, 1.0],
            "size": [h, w],
            "dynamic_batch": True,
            "dynamic_size": dynamic,
        },
        "output": {"name": "logits", "shape": ["B", "C", "H", "W"] if info.per_pixel else ["B", "C"]},
        "normalisation": {
            "mean": info.mean,
            "std": info.std,
            "inside_model": True,
            "formula": "(x - mean) / std on x in [0, 1]",
        },
        "check": {"max_abs_logit_diff": diff, "tolerance": tolerance, "inputs": [list(t.shape) for t in checked]},
        "lora_layers_merged": lora,
        "opset": opset,
        "torch": torch.__version__,
        **(extra or {}),
    }
    side["sidecar_sha256"] = sidecar_checksum(side)
    atomic_write_text(sidecar_path(path), json.dumps(side, indent=1))
    return side


def export_run(
    source: str | Path,
    out: str | Path | None = None,
    checkpoint: str = "last",
    *,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    wise_ft: float | None = None,
    class_names: list[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = 17,
    fmt: str = "onnx",
) -> tuple[Path, dict[str, Any]]:
    """Export a run folder's (or weight file's) ``checkpoint`` to ONNX; ``out`` defaults to
    ``<run>/model_<checkpoint>.onnx``. Returns (path, sidecar)."""
    from asg import __version__
    from asg.predict.loading import load_model, say

    if fmt != "onnx":
        raise AsgError(f"--format {fmt!r}: only onnx is supported")
    loaded = load_model(
        source, checkpoint, config=config, overrides=overrides, wise_ft=wise_ft, class_names=class_names
    )
    say(loaded.notes)
    if out is None:
        folder = loaded.source if loaded.source.is_dir() else loaded.source.parent
        tag = Path(loaded.checkpoint).stem.replace("-", "_").replace(".", "_")
        out = folder / f"model_{tag}{f'_wise_ft{wise_ft:g}' if wise_ft is not None else ''}.onnx"
    extra = {
        "source": str(loaded.source),
        "checkpoint": loaded.checkpoint,
        "weights": str(loaded.weights),
        "wise_ft_alpha": loaded.wise_ft_alpha,
        "asg_version": __version__,
        "config": config_to_dict(loaded.cfg),
    }
    path = Path(out)
    return path, export_onnx(
        loaded.model, loaded.info, path, tolerance=tolerance, opset=opset, fuse_bn=loaded.cfg.eval.fuse_bn, extra=extra
    )
