"""The object every benchmark builds: training set, evaluation sets and class names, plus split helpers."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from asg.errors import DataError

IGNORE_INDEX = 255  # segmentation label of an unlabelled pixel (Cityscapes trainId convention)


class DataWarning(UserWarning):
    """A dataset that trains but is probably not what was meant (emitted by :func:`warn_bundle`)."""


@dataclass
class DataBundle:
    """Datasets of one benchmark. Each yields ``(image FloatTensor [3, H, W] in [0, 1], target)``.

    ``task`` "classification": the target is an int label. "segmentation": a LongTensor [H, W] of class ids with
    ``ignore_index`` (255) where a pixel is unlabelled; evaluation images may differ in size (native resolution).

    ``eval_sets`` holds the held-out synthetic split (key ``source_val_name``, if any) and the real test sets;
    ``target_sets`` unlabelled real images for ``asg adapt`` (disjoint from the test sets).
    ``has_augmentation`` is True when a training sample differs per access (teacher outputs can't be cached).
    """

    train: Dataset
    eval_sets: dict[str, Dataset]
    source_val_name: str | None
    class_names: list[str]
    has_augmentation: bool = False
    task: str = "classification"  # "classification" | "segmentation"
    ignore_index: int = IGNORE_INDEX
    palette: list[tuple[int, int, int]] | None = None  # colour per class for prediction images (segmentation)
    # unlabelled target images for adaptation (items are images only, see asg.data.targets), and the labelled
    # view of the same items, read only by the adaptation report (pseudo-label precision) after adaptation
    target_sets: dict[str, Dataset] = field(default_factory=dict)
    target_truth: dict[str, Dataset] = field(default_factory=dict)
    # named groups of class ids whose mean per-class metric every evaluation reports beside the primary metric
    # (digit scenes: "digit" 1-10 and "background" 0, the scenes' main figure being the mean digit IoU)
    class_groups: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def real_set_names(self) -> list[str]:
        """Evaluation sets other than the synthetic source-val split, in insertion order."""
        return [name for name in self.eval_sets if name != self.source_val_name]

    def summary(self) -> dict[str, int]:
        """Number of images per set, e.g. ``{"train": 5400, "synthetic": 600, "mnist5k": 5000}``."""
        return {"train": len(self.train), **{k: len(v) for k, v in self.eval_sets.items()}}  # type: ignore[arg-type]

    def warnings(self) -> list[str]:
        """One-line problems of the training set that do not stop training (one class only, classes without images).

        Reads only ``train.labels`` (no image is opened); a training set without ``labels`` gives no warnings.
        """
        labels = getattr(self.train, "labels", None)
        if self.task != "classification" or labels is None or len(labels) == 0:
            return []
        present = set(np.unique(np.asarray(labels, dtype=np.int64)).tolist())
        names = self.class_names
        out = []
        if len(present) == 1:
            (c,) = present
            name = names[c] if 0 <= c < len(names) else str(c)
            out.append(
                f"the training set has images of one class only ({name!r}): training accuracy reaches a meaningless "
                f"100%; check the training labels"
            )
        absent = [names[c] for c in range(len(names)) if c not in present]
        if absent and len(present) > 1:
            shown = ", ".join(absent[:10]) + (f" (+{len(absent) - 10} more)" if len(absent) > 10 else "")
            out.append(f"class(es) {shown} have no training image: the model cannot learn them")
        return out


def warn_bundle(bundle: DataBundle) -> list[str]:
    """Emit each of ``bundle.warnings()`` with ``warnings.warn(msg, DataWarning)``; returns the messages.

    Call once after building the data and before training (the trainer and ``asg`` CLI show them on stderr).
    """
    messages = bundle.warnings()
    for msg in messages:
        warnings.warn(msg, DataWarning, stacklevel=2)
    return messages


class LabeledSubset(Dataset):
    """``dataset[indices]`` that keeps a ``labels`` array when the dataset has one (torch's Subset drops it).

    Segmentation datasets have no per-image labels; their subsets simply have none either.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        if hasattr(dataset, "labels"):
            self.labels = np.asarray(dataset.labels, dtype=np.int64)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset[int(self.indices[i])]


def stratified_split(labels: Sequence[int] | np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class into (keep, held_out) with ``round(fraction * n_c)`` held out of each class.

    Deterministic for ``seed``; a class with a single image stays in ``keep``. Both outputs are sorted.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"source_val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919]))
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_held = min(int(round(fraction * len(idx))), len(idx) - 1)
        if n_held > 0:
            held.append(rng.permutation(idx)[:n_held])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out


def split_source_val(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train part, held-out part or None when ``fraction`` is 0 or nothing could be held out)."""
    if fraction <= 0:
        return dataset, None
    keep, held_out = stratified_split(dataset.labels, fraction, seed)  # type: ignore[attr-defined]
    if len(held_out) == 0:
        return dataset, None
    return LabeledSubset(dataset, keep), LabeledSubset(dataset, held_out)


def balanced_subset(ds: Dataset, max_items: int, seed: int = 0) -> Dataset:
    """At most ``max_items`` items, as equal per class as the class sizes allow; deterministic for ``seed``.

    Classes are drawn round-robin from per-class shuffles (a small class gives all it has, the others fill up).
    Returns ``ds`` itself when it already has ``<= max_items`` items; the result keeps ``.labels``. A dataset
    without per-image labels (segmentation) gives a seeded uniform subset.
    """
    if max_items <= 0:
        raise DataError(f"balanced_subset: max_items must be positive, got {max_items}")
    if len(ds) <= max_items:  # type: ignore[arg-type]
        return ds
    if not hasattr(ds, "labels"):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 104729]))
        return LabeledSubset(ds, np.sort(rng.permutation(len(ds))[:max_items]))  # type: ignore[arg-type]
    labels = np.asarray(ds.labels, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 104729]))
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    sizes = np.array([len(p) for p in pools])
    # water-filling: the largest per-class quota q with sum(min(size, q)) <= max_items, then spread the rest
    quota = np.zeros(len(pools), dtype=np.int64)
    remaining = max_items
    while remaining > 0:
        open_classes = np.flatnonzero(quota < sizes)
        take = max(remaining // len(open_classes), 1)
        for c in open_classes:
            add = min(take, sizes[c] - quota[c], remaining)
            quota[c] += add
            remaining -= add
            if remaining == 0:
                break
    chosen = np.sort(np.concatenate([p[:q] for p, q in zip(pools, quota)]))
    return LabeledSubset(ds, chosen)
