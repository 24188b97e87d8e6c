"""One ``asg predict``: load the model (run folder, weight file or ``.onnx``), read the inputs in batches, write the
outputs. An unreadable image is skipped, named and counted; the caller's exit code says that some failed."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asg.data.images import ImageReadError
from asg.predict.inputs import DEFAULT_MAX_PIXELS, InputItem, collect_inputs, load_image
from asg.predict.predictor import Predictor
from asg.predict.writers import PredictionWriter, prepare_out
from asg.utils import progress


def load_predictor(
    source: str | Path,
    checkpoint: str = "last",
    *,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    wise_ft: float | None = None,
    class_names: list[str] | None = None,
    device: str = "auto",
    quiet: bool = False,
    **options: Any,
) -> tuple[Predictor, dict[str, Any]]:
    """(Predictor, what it runs) for a run folder, a weight file with ``config`` or an exported ``.onnx`` file.
    ``options`` go to :class:`Predictor` (batch_size, tta_flip, sliding_window, scales, precision, top_k)."""
    from asg.errors import AsgError
    from asg.utils import resolve_device

    if str(source).endswith(".onnx"):
        from asg.predict.onnx_runner import load_onnx

        if wise_ft is not None:
            raise AsgError("--wise-ft needs the run folder: an exported .onnx file holds one set of weights")
        if device not in ("auto", "cpu"):
            raise AsgError("a .onnx model runs on the CPU with onnxruntime here: leave out --device")
        session, info, side = load_onnx(source)
        described = {"model": str(source), "checkpoint": side.get("checkpoint"), "runtime": "onnxruntime"}
        return Predictor(session, info, device="cpu", **options), described
    from asg.models.fusion import inference_copy
    from asg.predict.loading import load_model, say

    torch_device = resolve_device(device)
    loaded = load_model(
        source, checkpoint, config=config, overrides=overrides, wise_ft=wise_ft, class_names=class_names
    )
    if not quiet:
        say(loaded.notes)
    model = inference_copy(loaded.model) if loaded.cfg.eval.fuse_bn else loaded.model
    described = {
        "model": str(loaded.source),
        "checkpoint": loaded.checkpoint,
        "weights": str(loaded.weights),
        "wise_ft_alpha": loaded.wise_ft_alpha,
        "runtime": "torch",
        "device": str(torch_device),
        "notes": loaded.notes,
    }
    return Predictor(model.to(torch_device), loaded.info, device=torch_device, **options), described


def predict_files(
    source: str | Path,
    inputs: Sequence[str],
    out: str | Path,
    *,
    overwrite: bool = False,
    label_ids: str = "train",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    show_progress: bool = True,
    stdin: Any = None,
    **load_options: Any,
) -> dict[str, Any]:
    """Predict every image of ``inputs`` into ``out``; returns the summary (``predicted``, ``failed``, counts).
    ``load_options`` go to :func:`load_predictor`."""
    items = collect_inputs(list(inputs), stdin)  # before loading: a wrong path fails at once
    out = Path(out)
    prepare_out(out, overwrite)
    predictor, described = load_predictor(source, **load_options)
    writer = PredictionWriter(out, predictor.info, label_ids)
    batch: list[tuple[InputItem, Any]] = []

    def flush() -> None:
        preds = predictor.predict_batch([img for _, img in batch])
        for (item, img), pred in zip(batch, preds):
            writer.add(item, pred, img)
        batch.clear()

    for item in progress(items, desc="predict", enabled=show_progress, unit="img"):
        try:
            batch.append((item, load_image(item.path, max_pixels)))
        except ImageReadError as exc:
            writer.add_failed(item, exc.reason)
            print(f"asg: warning: skipped {item.path}: {exc.reason}", file=sys.stderr)
            continue
        if len(batch) == predictor.batch_size:
            flush()
    if batch:
        flush()
    settings = {
        **described,
        "task": predictor.info.task,
        "tta_flip": predictor.tta_flip,
        "sliding_window": list(predictor.window) if predictor.window else None,
        "scales": list(predictor.scales),
        "precision": predictor.precision,
        "label_ids": label_ids,
        "inputs": len(items),
    }
    return writer.finish(settings)
