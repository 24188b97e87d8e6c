"""Inference speed on the CPU (``asg predict``'s own code): images per second of :class:`asg.predict.Predictor`
with the PyTorch model (eager, and ``torch.compile`` where it works) against the same Predictor driving the
exported ONNX model in onnxruntime (:mod:`asg.predict.onnx_runner`), for classification (digits recipe:
EfficientNet-Lite0) and segmentation (digit scenes recipe: Lite0 + FPN), at the embedded benchmarks' 64 px and at
512 px.

What is timed is ``Predictor.predict_batch`` on decoded PIL images: preprocessing (resize / crop or tensor
conversion), the network, softmax / argmax, and per-image results (masks and class fractions for segmentation).
The models are built as ``asg predict`` builds a run's (BatchNorm folded, ``eval.fuse_bn``), with random weights
(``model.weights=none``: speed does not depend on the values); the ONNX file is made by ``asg export``'s own
:func:`asg.predict.export.export_onnx`, its check against PyTorch included. No flip TTA, whole images (no sliding
window). Both runtimes get the same number of threads (``--threads``, default 1: on a machine shared with other
jobs more threads than free cores make PyTorch slower, not faster).

``torch.compile`` runs in a child process per case with a time limit (``COMPILE_TIMEOUT_S``, compilation
included); where it fails or runs out of time the case records why and the rest goes on.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# name -> (recipe, task); sizes: the embedded benchmarks' 64 px and 512 px
CASES = {
    "classification": ("digits_erm", "classification"),
    "segmentation": ("digit_scenes_erm", "segmentation"),
}
SIZES = (64, 512)
BATCH = {64: 16, 512: 4}
MIN_TIME_S = 2.0  # time each (case, runtime) for at least this long after warm-up ...
MIN_BATCHES = 3  # ... and at least this many batches
COMPILE_TIMEOUT_S = 150


def build_predictor(recipe: str, size: int, runtime: str, threads: int, tmp: Path | None = None) -> Any:
    """A :class:`Predictor` of ``recipe``'s model at ``size`` px: ``runtime`` eager | compile | onnxruntime."""
    import torch

    from asg.config import load_config
    from asg.engine.rundir.model_info import model_info_from_config
    from asg.models import build_model
    from asg.models.fusion import inference_copy
    from asg.predict.predictor import Predictor

    torch.set_num_threads(threads)
    cfg = load_config(recipe, ["model.weights=none", f"data.image_size={size}", "eval.tta_flip=false"])
    info = model_info_from_config(cfg, None, None)
    torch.manual_seed(0)
    model = build_model(cfg.model, info.num_classes, task=info.task).eval()
    info.mean = [float(v) for v in model.backbone.mean.flatten().tolist()]  # type: ignore[union-attr, operator]
    info.std = [float(v) for v in model.backbone.std.flatten().tolist()]  # type: ignore[union-attr, operator]
    options = {"batch_size": BATCH[size], "tta_flip": False, "sliding_window": None}
    if runtime == "onnxruntime":
        from asg.predict.export import export_onnx
        from asg.predict.onnx_runner import load_onnx

        assert tmp is not None
        path = tmp / f"{recipe}_{size}.onnx"
        export_onnx(model, info, path, fuse_bn=cfg.eval.fuse_bn)
        session, onnx_info, _ = load_onnx(path, threads=threads)
        return Predictor(session, onnx_info, **options)
    fused = inference_copy(model) if cfg.eval.fuse_bn else model
    if runtime == "compile":
        fused = torch.compile(fused)
    return Predictor(fused, info, **options)


def images(size: int, n: int) -> list:
    """``n`` random RGB PIL images of ``size`` x ``size``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def time_predictor(predictor: Any, size: int) -> dict:
    """Images per second of ``predictor.predict_batch`` on random ``size`` px images (median batch time); the first
    call (warm-up; compilation for torch.compile) is timed apart."""
    batch = images(size, predictor.batch_size)
    t0 = time.perf_counter()
    predictor.predict_batch(batch)
    first = time.perf_counter() - t0
    predictor.predict_batch(batch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_BATCHES or time.perf_counter() - start < MIN_TIME_S:
        t0 = time.perf_counter()
        predictor.predict_batch(batch)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "images_per_s": len(batch) / median,
        "batch": len(batch),
        "batches": len(times),
        "batch_s_median": median,
        "first_call_s": first,
    }


def _compile_case(recipe: str, size: int, threads: int) -> dict:
    """torch.compile in a child process with a time limit: its figures, or ``skipped`` with the reason."""
    cmd = [sys.executable, __file__, "--compile-case", recipe, str(size), str(threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"skipped": f"compilation and timing took over {COMPILE_TIMEOUT_S} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"skipped": f"torch.compile failed: {last[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def predict_throughput(threads: int = 1, compile: bool = True) -> dict:
    """Images per second per (task, size, runtime), and each runtime's speed relative to eager PyTorch."""
    import onnxruntime
    import torch

    out: dict[str, Any] = {
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "timed": "Predictor.predict_batch on decoded PIL images (preprocessing, network, "
        "softmax/argmax, per-image results); median batch time after one warm-up call; BN "
        "folded; no flip TTA; whole images",
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (recipe, _task) in CASES.items():
            for size in SIZES:
                row: dict[str, Any] = {"recipe": recipe, "size": size}
                row["eager"] = time_predictor(build_predictor(recipe, size, "eager", threads), size)
                row["onnxruntime"] = time_predictor(
                    build_predictor(recipe, size, "onnxruntime", threads, Path(tmp)), size
                )
                if compile:
                    row["compile"] = _compile_case(recipe, size, threads)
                for runtime in ("onnxruntime", "compile"):
                    if "images_per_s" in row.get(runtime, {}):
                        row[runtime]["speed_vs_eager"] = row[runtime]["images_per_s"] / row["eager"]["images_per_s"]
                out["cases"][f"{name}_{size}"] = row
                print(f"  {name} {size} px: " + format_row(row), flush=True)
    return out


def format_row(row: dict) -> str:
    def cell(runtime: str) -> str:
        r = row.get(runtime)
        if r is None:
            return f"{runtime} not run"
        if "images_per_s" not in r:
            return f"{runtime} skipped ({r['skipped']})"
        ratio = f" ({r['speed_vs_eager']:.2f}x)" if "speed_vs_eager" in r else ""
        return f"{runtime} {r['images_per_s']:.1f}{ratio}"

    return ", ".join(cell(r) for r in ("eager", "onnxruntime", "compile")) + " images/s"


def _ips(row: dict, runtime: str) -> str:
    r = row.get(runtime, {})
    return f"{r['images_per_s']:.1f}" if "images_per_s" in r else "skipped"


def _ratio(row: dict, runtime: str) -> str:
    r = row.get(runtime, {})
    return f"{r['speed_vs_eager']:.2f}" if "speed_vs_eager" in r else "-"


def markdown_rows(result: dict) -> list[tuple[str, str, str]]:
    """Rows (what, measured, ratio) of ``benchmarks/results.md``: one per (task, size)."""
    rows = []
    for name, row in result["cases"].items():
        task = name.rsplit("_", 1)[0]
        model = "Lite0" if task == "classification" else "Lite0 + FPN"
        rows.append(
            (
                f"asg predict on the CPU ({result['threads']} thread), {task} ({model}, `{row['recipe']}`) at "
                f"{row['size']} px, batch {row['eager']['batch']}: eager / onnxruntime / torch.compile",
                f"{_ips(row, 'eager')} / {_ips(row, 'onnxruntime')} / {_ips(row, 'compile')} images/s",
                f"1 / {_ratio(row, 'onnxruntime')} / {_ratio(row, 'compile')} speed",
            )
        )
    return rows


if __name__ == "__main__" and sys.argv[1:2] == ["--compile-case"]:
    recipe, size, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(time_predictor(build_predictor(recipe, size, "compile", threads), size)))
