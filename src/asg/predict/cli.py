"""The ``asg predict`` and ``asg export`` commands (parsers and handlers; ``asg.cli`` registers them)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def _pair(text: str) -> list[int] | str | None:
    """``H,W`` (or one number for a square) -> [H, W]; "none" -> None; "auto" stays (the recipe's)."""
    if text.lower() in ("none", "auto"):
        return None if text.lower() == "none" else "auto"
    parts = [int(v) for v in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give H,W (positive) or none")
    return parts


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 0.75,1,1.25") from None


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _add_model_args(p: argparse.ArgumentParser, add_set: Callable[[argparse.ArgumentParser, str], None]) -> None:
    p.add_argument("--checkpoint", default="last", help="last | source-val | oracle | PATH.safetensors")
    p.add_argument(
        "--config",
        default=None,
        help="with a weight file (official .pth.tar, .safetensors): the recipe that builds its model",
    )
    add_set(p, "override the run's config, e.g. --set model.weights=/path/to/imagenet.pth")
    p.add_argument(
        "--wise-ft",
        dest="wise_ft",
        type=float,
        default=None,
        metavar="ALPHA",
        help="WiSE-FT: backbone (1-ALPHA) x ImageNet + ALPHA x fine-tuned, fine-tuned head",
    )
    p.add_argument(
        "--class-names",
        dest="class_names",
        type=_names,
        default=None,
        metavar="A,B,...",
        help="class names in label order (a run of an earlier asg does not record them)",
    )


def add_tta_flags(p: argparse.ArgumentParser, help: str) -> None:
    """``--tta-flip`` / ``--no-tta-flip`` into ``args.tta_flip`` (None: neither given, the recipe decides)."""
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta-flip", dest="tta_flip", action="store_true", default=None, help=help)
    tta.add_argument("--no-tta-flip", dest="tta_flip", action="store_false")


def add_predict_parser(
    sub: argparse._SubParsersAction, add_set: Callable[[argparse.ArgumentParser, str], None]
) -> None:
    p = sub.add_parser(
        "predict",
        help="label images (classes, or masks for segmentation) with a trained model",
        description="Predict with a run folder, a weight file (--config) or an exported .onnx file; "
        "never reads the training or evaluation data.",
    )
    p.add_argument(
        "model", help="a run folder of `asg train`/`asg adapt`, a weight file (with --config) or a .onnx file"
    )
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive), list files, or - (a list on stdin)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _add_model_args(p, add_set)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 (fp16 on a GPU only)")
    add_tta_flags(p, "average with the mirrored image (default: the recipe's eval.tta_flip)")
    p.add_argument(
        "--sliding-window",
        dest="sliding_window",
        type=_pair,
        default="auto",
        metavar="H,W",
        help="segmentation: H x W windows, or none for whole images (default: the recipe's)",
    )
    p.add_argument("--sliding-stride", dest="sliding_stride", type=_pair, default=None, metavar="H,W")
    p.add_argument("--scales", type=_floats, default=[1.0], help="segmentation: multi-scale factors, e.g. 0.75,1,1.25")
    p.add_argument("--top-k", dest="top_k", type=int, default=5, help="classification: classes listed per image")
    p.add_argument(
        "--label-ids",
        dest="label_ids",
        default="train",
        help="segmentation masks in train ids (train) or Cityscapes label ids (cityscapes)",
    )
    p.add_argument(
        "--max-pixels",
        dest="max_pixels",
        type=int,
        default=None,
        help="refuse images with more pixels (default: PIL's limit, 89,478,485)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the predictions already in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_export_parser(sub: argparse._SubParsersAction, add_set: Callable[[argparse.ArgumentParser, str], None]) -> None:
    p = sub.add_parser(
        "export",
        help="export a run's task model to ONNX, checked against PyTorch",
        description="Writes MODEL.onnx and MODEL.onnx.json (class names, normalisation, input size, "
        "the training config's hash); refuses if onnxruntime and PyTorch disagree.",
    )
    p.add_argument("model", help="a run folder, or a weight file with --config")
    p.add_argument("--format", dest="fmt", default="onnx", help="onnx")
    p.add_argument("--out", type=Path, default=None, help="the .onnx file (default <run>/model_<checkpoint>.onnx)")
    _add_model_args(p, add_set)
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest logit difference accepted (default 1e-3)")
    p.add_argument("--opset", type=int, default=17)


def predict_command(args: argparse.Namespace) -> int:
    from asg.predict.inputs import DEFAULT_MAX_PIXELS
    from asg.predict.run import predict_files
    from asg.tasks import get_task

    summary = predict_files(
        args.model,
        args.inputs,
        args.out,
        overwrite=args.overwrite,
        label_ids=args.label_ids,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        show_progress=args.progress,
        checkpoint=args.checkpoint,
        config=args.config,
        overrides=args.overrides,
        wise_ft=args.wise_ft,
        class_names=args.class_names,
        device=args.device,
        batch_size=args.batch_size,
        tta_flip=args.tta_flip,
        sliding_window=args.sliding_window,
        sliding_stride=args.sliding_stride,
        scales=args.scales,
        precision=args.precision,
        top_k=args.top_k,
    )
    if get_task(summary["task"]).per_pixel:
        shown = sorted(summary["mean_fractions"].items(), key=lambda kv: -kv[1])[:8]
        print("mean pixel fraction: " + ", ".join(f"{n} {100 * v:.1f} %" for n, v in shown))
    else:
        print("images per class: " + ", ".join(f"{n} {c}" for n, c in summary["class_counts"].items() if c))
    print(f"predicted {summary['predicted']} image(s) into {args.out}")
    if summary["failed"]:
        print(
            f"asg: error: {summary['failed']} image(s) could not be read; listed in {args.out / 'failed.txt'}",
            file=sys.stderr,
        )
        return 1
    return 0


def export_command(args: argparse.Namespace) -> int:
    from asg.predict.export import export_run

    path, side = export_run(
        args.model,
        args.out,
        args.checkpoint,
        config=args.config,
        overrides=args.overrides,
        wise_ft=args.wise_ft,
        class_names=args.class_names,
        tolerance=args.tolerance,
        opset=args.opset,
        fmt=args.fmt,
    )
    check = side["check"]
    size = "dynamic" if side["input"]["dynamic_size"] else "fixed"
    print(
        f"onnxruntime vs PyTorch: largest logit difference {check['max_abs_logit_diff']:.2e} "
        f"(tolerance {check['tolerance']:g}) on inputs {check['inputs']}"
    )
    print(
        f"wrote {path} ({side['task']}, {len(side['class_names'])} classes, input {side['input']['size']} "
        f"{size} size, dynamic batch) and {path.name}.json"
    )
    return 0
