"""Pseudo-labelling a target set with the current model (one adaptation round's first stage).

Predictions use the run's evaluation protocol (``eval.tta_flip``; segmentation: ``eval.sliding_window``) in eval
mode. Classification keeps all class probabilities in memory (N x C) and thresholds exactly; segmentation makes
two passes over the images (confidence histograms, then labels) and writes one PNG of pseudo-labels per image
(255 = not selected) at the resolution the image was predicted at. Files are written before the round trains
and ``pseudo_labels.json`` last, so a round whose pseudo-labels exist can be resumed with exactly them.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from asg.adapt.thresholds import ConfidenceHistogram, class_thresholds, select
from asg.config import Config
from asg.data.bundle import IGNORE_INDEX
from asg.errors import AsgError
from asg.io import atomic_write
from asg.models.fusion import inference_copy
from asg.models.inference import predict_scores, segmentation_probs, sliding_options
from asg.tasks import get_task
from asg.utils import progress

STATS_FILE = "pseudo_labels.json"
LABELS_FILE = "pseudo_labels.npz"
PNG_FOLDER = "pseudo"


class DamagedPseudoLabels(AsgError):
    """A round's pseudo-label files do not match the SHA-256 recorded in its ``pseudo_labels.json``."""


@dataclass
class PseudoLabels:
    """A round's selection. ``indices`` [M]: target items trained on; classification ``labels`` [M];
    segmentation: one PNG per item under ``folder``/pseudo. ``stats``: what ``pseudo_labels.json`` holds."""

    folder: Path
    indices: np.ndarray
    labels: np.ndarray | None
    stats: dict[str, Any]

    def label(self, j: int) -> Any:
        """Pseudo-label of the j-th selected item: an int, or LongTensor [H, W] (255 = not selected)."""
        if self.labels is not None:
            return int(self.labels[j])
        ids = np.array(Image.open(png_path(self.folder, int(self.indices[j]))), dtype=np.int64)
        return torch.from_numpy(ids)


def png_path(folder: Path, index: int) -> Path:
    return folder / PNG_FOLDER / f"{index:07d}.png"


def _batches(dataset: Dataset, batch_size: int) -> Iterator[list[tuple[int, Tensor]]]:
    """Lists of (index, image) of ``dataset``; unreadable (None) items are left out."""
    n = len(dataset)  # type: ignore[arg-type]
    for start in range(0, n, batch_size):
        items = [(i, dataset[i]) for i in range(start, min(start + batch_size, n))]
        yield [(i, x) for i, x in items if x is not None]


@torch.no_grad()
def _seg_probs(model: nn.Module, images: list[Tensor], cfg: Config, device: torch.device) -> list[Tensor]:
    window, stride = sliding_options(cfg)
    if len({tuple(x.shape) for x in images}) == 1:
        x = torch.stack(images).to(device)
        return list(segmentation_probs(model, x, tta_flip=cfg.eval.tta_flip, window=window, stride=stride).cpu())
    return [_seg_probs(model, [x], cfg, device)[0] for x in images]


@torch.no_grad()
def pseudo_label(
    model: nn.Module,
    target: Dataset,
    cfg: Config,
    portion: float,
    num_classes: int,
    folder: Path,
    device: torch.device,
    task: str,
    show_progress: bool = False,
) -> PseudoLabels:
    """Pseudo-label ``target`` (items: image tensors) with ``model`` keeping ``portion`` per class; write the
    round's files into ``folder`` and return them."""
    was_training = model.training
    model.eval()
    original, model = model, inference_copy(model) if cfg.eval.fuse_bn else model
    unit = get_task(task).unit
    labelled = LABELLERS[unit](model, target, cfg, portion, num_classes, folder, device, show_progress)
    result, thresholds, counts, selected, total, checksum = labelled
    original.train(was_training)
    if selected == 0:
        raise AsgError(f"adaptation: no target {unit.rstrip('s')} was selected")
    rule = cfg.adapt.thresholds
    result.stats = {
        "portion": portion,
        "rule": rule,
        "thresholds": [None if not np.isfinite(t) else float(t) for t in thresholds],
        "class_counts": counts.tolist(),
        "selected": selected,
        "total": total,
        "unit": unit,
        "images": len(result.indices),
        "sha256": checksum,  # of pseudo_labels.npz, or of the PNGs' bytes in index order
    }
    text = json.dumps(result.stats, indent=1)
    atomic_write(folder / STATS_FILE, lambda tmp: Path(tmp).write_text(text))
    return result


# result, class thresholds, class counts, selected and total items (images or pixels), sha256 of the files
Labelled = tuple[PseudoLabels, Any, np.ndarray, int, int, str]


def _label_pixels(
    model: nn.Module,
    target: Dataset,
    cfg: Config,
    portion: float,
    num_classes: int,
    folder: Path,
    device: torch.device,
    show_progress: bool,
) -> Labelled:
    """Segmentation: a confidence histogram pass for the class thresholds, then one PNG of pixel labels per image
    (255 = not selected)."""
    bs = cfg.data.eval_batch_size
    hist = ConfidenceHistogram(num_classes)
    for batch in progress(_batches(target, bs), desc="pseudo-labels 1/2", enabled=show_progress, leave=False):
        for p in _seg_probs(model, [x for _, x in batch], cfg, device):
            conf, pred = p.max(dim=0)
            hist.add(conf, pred)
    thresholds = hist.thresholds(portion, cfg.adapt.thresholds)
    counts = np.zeros(num_classes, dtype=np.int64)
    selected_pixels, total_pixels = 0, 0
    indices: list[int] = []
    digest = hashlib.sha256()  # over the PNG files' bytes, in index order
    (folder / PNG_FOLDER).mkdir(parents=True, exist_ok=True)
    for batch in progress(_batches(target, bs), desc="pseudo-labels 2/2", enabled=show_progress, leave=False):
        probs = _seg_probs(model, [x for _, x in batch], cfg, device)
        for (i, _), p in zip(batch, probs):
            ids, _ = select(p, thresholds)
            on = ids != IGNORE_INDEX
            counts += np.bincount(ids[on].numpy(), minlength=num_classes)[:num_classes]
            selected_pixels += int(on.sum())
            total_pixels += ids.numel()
            png = _png_bytes(ids.numpy().astype(np.uint8))
            digest.update(png)
            atomic_write(png_path(folder, i), lambda tmp, b=png: Path(tmp).write_bytes(b))
            indices.append(i)
    result = PseudoLabels(folder, np.asarray(indices, dtype=np.int64), None, {})
    return result, thresholds, counts, selected_pixels, total_pixels, digest.hexdigest()


def _label_images(
    model: nn.Module,
    target: Dataset,
    cfg: Config,
    portion: float,
    num_classes: int,
    folder: Path,
    device: torch.device,
    show_progress: bool,
) -> Labelled:
    """Classification: the kept images' indices, labels and confidences in one ``.npz``."""
    all_idx: list[int] = []
    all_probs: list[Tensor] = []
    bs = cfg.data.eval_batch_size
    for batch in progress(_batches(target, bs), desc="pseudo-labels", enabled=show_progress, leave=False):
        if not batch:
            continue
        x = torch.stack([img for _, img in batch]).to(device)
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        scores = predict_scores(model, x, cfg.eval.tta_flip).float()
        # flip TTA averages sigmoids (the VisDA protocol): normalised to sum 1 to serve as confidences
        p = scores / scores.sum(1, keepdim=True) if cfg.eval.tta_flip else torch.softmax(scores, dim=1)
        all_idx += [i for i, _ in batch]
        all_probs.append(p.cpu())
    if not all_probs:
        raise AsgError("adapt.target: no target image could be read")
    every = torch.cat(all_probs)
    conf, pred = every.max(dim=1)
    thresholds = class_thresholds(conf.numpy(), pred.numpy(), portion, num_classes, cfg.adapt.thresholds)
    chosen, _ = select(every, thresholds)
    kept = (chosen != IGNORE_INDEX).numpy()
    sel_indices = np.asarray(all_idx, dtype=np.int64)[kept]
    sel_labels = chosen.numpy()[kept]
    counts = np.bincount(sel_labels, minlength=num_classes)[:num_classes]
    buf = io.BytesIO()
    np.savez(buf, indices=sel_indices, labels=sel_labels, conf=conf.numpy()[kept])
    data = buf.getvalue()
    atomic_write(folder / LABELS_FILE, lambda tmp: Path(tmp).write_bytes(data))
    result = PseudoLabels(folder, sel_indices, sel_labels, {})
    return result, thresholds, counts, int(kept.sum()), len(target), hashlib.sha256(data).hexdigest()  # type: ignore[arg-type]


LABELLERS = {"pixels": _label_pixels, "images": _label_images}  # by the task's unit


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def load_pseudo_labels(folder: Path) -> PseudoLabels | None:
    """The round's pseudo-labels written by :func:`pseudo_label`, or None when they were not completed.

    DamagedPseudoLabels when a file cannot be read or does not match the SHA-256 in ``pseudo_labels.json``."""
    stats_path = folder / STATS_FILE
    if not stats_path.is_file():
        return None
    redo = "its pseudo-labels are computed again"
    try:
        stats = json.loads(stats_path.read_text())
        if stats["unit"] == "pixels":
            names = sorted((folder / PNG_FOLDER).glob("*.png"))
            indices = np.asarray([int(p.stem) for p in names], dtype=np.int64)
            if "sha256" in stats:
                digest = hashlib.sha256()
                for p in names:
                    digest.update(p.read_bytes())
                if digest.hexdigest() != stats["sha256"] or len(names) != stats.get("images", len(names)):
                    raise DamagedPseudoLabels(
                        f"{folder / PNG_FOLDER} does not match its checksum in {stats_path}; {redo}"
                    )
            return PseudoLabels(folder, indices, None, stats)
        data = (folder / LABELS_FILE).read_bytes()
        if "sha256" in stats and hashlib.sha256(data).hexdigest() != stats["sha256"]:
            raise DamagedPseudoLabels(f"{folder / LABELS_FILE} does not match its checksum in {stats_path}; {redo}")
        with np.load(io.BytesIO(data)) as arrays:
            return PseudoLabels(folder, arrays["indices"], arrays["labels"], stats)
    except DamagedPseudoLabels:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise DamagedPseudoLabels(
            f"cannot read the pseudo-labels in {folder} ({type(exc).__name__}: {exc}); {redo}"
        ) from None
