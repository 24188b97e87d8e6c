"""What ``asg predict`` writes into ``--out``, each file atomically.

Classification: ``predictions.csv`` and ``predictions.jsonl`` (path, class, probability, top-k) and the per-class
count in ``summary.json``. Segmentation: ``masks/<key>.png`` (train ids, or Cityscapes label ids on request),
``overlays/<key>.png`` (the image blended with the class colours) and ``predictions.jsonl`` / ``.csv`` (per-image
class fractions). Both: ``failed.txt`` (one ``PATH: reason`` per image that could not be read) and ``summary.json``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from asg.engine.rundir.model_info import ModelInfo
from asg.errors import AsgError
from asg.io import atomic_write, atomic_write_text
from asg.predict.inputs import InputItem
from asg.predict.predictor import ClassPrediction, MaskPrediction

OUTPUTS = ("predictions.csv", "predictions.jsonl", "summary.json", "failed.txt", "masks", "overlays")


def prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out``; AsgError when it already holds predictions, unless ``overwrite`` (then they are removed)."""
    found = [name for name in OUTPUTS if (out / name).exists()]
    if found and not overwrite:
        raise AsgError(
            f"{out} already holds predictions ({', '.join(found)}); they are kept: pass --overwrite to "
            "replace them, or choose another --out"
        )
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def cityscapes_label_ids(info: ModelInfo) -> np.ndarray:
    """LUT [256] uint8 from this model's train ids to Cityscapes label ids (255 stays 255); AsgError unless its
    classes are a Cityscapes class set."""
    from asg.data.segmentation.street_classes import CITYSCAPES_CLASSES, CITYSCAPES_ID_TO_TRAIN

    if not set(info.class_names) <= set(CITYSCAPES_CLASSES):
        raise AsgError(
            "--label-ids cityscapes needs a model of Cityscapes classes; this one predicts "
            f"{', '.join(info.class_names[:5])}..."
        )
    train_to_id = {t: i for i, t in CITYSCAPES_ID_TO_TRAIN.items()}
    lut = np.full(256, 255, dtype=np.uint8)
    for k, name in enumerate(info.class_names):
        lut[k] = train_to_id[CITYSCAPES_CLASSES.index(name)]
    return lut


class PredictionWriter:
    """Collect predictions of one ``asg predict`` and write them into ``out``."""

    def __init__(self, out: Path, info: ModelInfo, label_ids: str = "train", overlay_alpha: float = 0.5) -> None:
        self.out, self.info, self.alpha = out, info, overlay_alpha
        self.rows: list[dict[str, Any]] = []
        self.failed: list[str] = []
        self.lut = cityscapes_label_ids(info) if label_ids == "cityscapes" else None
        if label_ids not in ("train", "cityscapes"):
            raise AsgError(f"--label-ids {label_ids!r}: use train or cityscapes")
        self.palette = np.zeros((256, 3), dtype=np.uint8)
        if info.palette:
            self.palette[: len(info.palette)] = np.asarray(info.palette, dtype=np.uint8)

    def add_failed(self, item: InputItem, reason: str) -> None:
        self.failed.append(f"{item.path}: {reason}")

    def add(self, item: InputItem, pred: ClassPrediction | MaskPrediction, image: Image.Image) -> None:
        if isinstance(pred, ClassPrediction):
            self.rows.append(
                {
                    "path": str(item.path),
                    "class": pred.name,
                    "label": pred.label,
                    "probability": round(pred.probability, 6),
                    "top_k": [[n, round(p, 6)] for n, p in pred.top_k],
                }
            )
            return
        mask = pred.mask if self.lut is None else self.lut[pred.mask]
        self._png(self.out / "masks" / f"{item.key}.png", Image.fromarray(mask, "L"))
        base = np.asarray(image.convert("RGB"), dtype=np.float32)
        blend = (1 - self.alpha) * base + self.alpha * self.palette[pred.mask].astype(np.float32)
        self._png(self.out / "overlays" / f"{item.key}.png", Image.fromarray(np.rint(blend).astype(np.uint8)))
        self.rows.append(
            {
                "path": str(item.path),
                "mask": f"masks/{item.key}.png",
                "overlay": f"overlays/{item.key}.png",
                "confidence": round(pred.confidence, 6),
                "fractions": {k: round(v, 6) for k, v in pred.fractions.items()},
            }
        )

    def _png(self, path: Path, img: Image.Image) -> None:
        atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))

    def finish(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Write predictions.jsonl/.csv, failed.txt and summary.json; returns the summary."""
        atomic_write_text(self.out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        buf = io.StringIO()
        writer = csv.writer(buf)
        names = self.info.class_names
        if self.info.per_pixel:
            writer.writerow(["path", "mask", "confidence", *names])
            for r in self.rows:
                writer.writerow([r["path"], r["mask"], r["confidence"], *(r["fractions"][n] for n in names)])
        else:
            k = max((len(r["top_k"]) for r in self.rows), default=0)
            writer.writerow(["path", "class", "probability", *(f"top{i + 1}" for i in range(k))])
            for r in self.rows:
                writer.writerow([r["path"], r["class"], r["probability"], *(f"{n}:{p:.4f}" for n, p in r["top_k"])])
        atomic_write_text(self.out / "predictions.csv", buf.getvalue())
        if self.failed:
            atomic_write_text(self.out / "failed.txt", "".join(line + "\n" for line in self.failed))
        summary: dict[str, Any] = {**settings, "predicted": len(self.rows), "failed": len(self.failed)}
        if self.info.per_pixel:
            pixels = {n: float(np.mean([r["fractions"][n] for r in self.rows])) if self.rows else 0.0 for n in names}
            summary["mean_fractions"] = pixels
        else:
            summary["class_counts"] = {n: sum(r["class"] == n for r in self.rows) for n in names}
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        return summary
