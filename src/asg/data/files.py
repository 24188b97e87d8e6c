"""Bad image files before and during training (``data.on_bad_image``: "error" | "skip").

Before training, :func:`check_bundle_files` stats every file of every file-backed dataset in a bundle
(one ``os.stat`` per file, nothing decoded): missing or empty files stop the run ("error") or are left out
("skip"). During training, an image that fails to decode is returned as ``None`` by its dataset in "skip"
mode, logged to ``skip_log`` (set with :func:`set_skip_log`) and dropped by :func:`collate_skip_none`.
Datasets without files (in-memory arrays) pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, default_collate

from asg.data.bundle import DataBundle, LabeledSubset
from asg.data.images import check_bad_image_mode
from asg.errors import DataError

SKIPPED_FILE = "skipped_images.txt"  # the run folder's list of skipped images, one "PATH: reason" a line
MAX_QUOTED = 3  # bad files quoted in an error


def is_file_backed(ds: Any) -> bool:
    """True for datasets whose items are image files (they have ``image_path(i)``; segmentation datasets also
    ``label_path(i)``, checked as well)."""
    return callable(getattr(ds, "image_path", None))


def unwrap(ds: Dataset) -> tuple[Dataset, np.ndarray | None]:
    """(innermost dataset, its indices as seen through nested subsets; None when ``ds`` is not a subset)."""
    idx: np.ndarray | None = None
    while hasattr(ds, "dataset") and hasattr(ds, "indices"):
        sub = np.asarray(ds.indices, dtype=np.int64)
        idx = sub if idx is None else sub[idx]
        ds = ds.dataset
    return ds, idx


def _bundle_sets(bundle: DataBundle) -> dict[str, Dataset]:
    return {"train": bundle.train, **bundle.eval_sets}


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be an image file ("missing", "empty (0 bytes)", ...), or None when it can be."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return "empty (0 bytes)" if st.st_size == 0 else None


def bad_files(ds: Dataset) -> dict[int, str]:
    """Index -> ``PATH: reason`` line for each missing or empty file of a file-backed dataset."""
    out = {}
    label_path = getattr(ds, "label_path", None)
    for i in range(len(ds)):  # type: ignore[arg-type]
        for path in (ds.image_path(i), label_path(i)) if callable(label_path) else (ds.image_path(i),):  # type: ignore[attr-defined]
            why = file_problem(path)
            if why is not None:
                where = ds.where(i) if hasattr(ds, "where") else ""  # type: ignore[attr-defined]
                out[i] = f"{path}: {why}" + (f" (listed at {where})" if where else "")
                break
    return out


def check_bundle_files(bundle: DataBundle, on_bad_image: str) -> tuple[DataBundle, list[str]]:
    """Stat every image file of ``bundle`` (train and every eval set); cheap, no decoding.

    "error": DataError (one line: how many, the first few ``PATH: reason (listed at FILE:LINE)``) if any file is
    missing or empty; else ``(bundle, [])``. "skip": ``(bundle without those items, ["PATH: reason ...", ...])``;
    a filtered set becomes a :class:`LabeledSubset` (``labels`` stay consistent). A set left empty is a DataError.
    """
    check_bad_image_mode(on_bad_image)
    cache: dict[int, dict[int, str]] = {}
    kept: dict[str, Dataset] = {}
    skipped: dict[str, None] = {}  # ordered set of lines
    for name, ds in _bundle_sets(bundle).items():
        base, idx = unwrap(ds)
        if not is_file_backed(base):
            kept[name] = ds
            continue
        if id(base) not in cache:
            cache[id(base)] = bad_files(base)
        bad = cache[id(base)]
        positions = np.arange(len(base)) if idx is None else idx  # type: ignore[arg-type]
        is_bad = np.isin(positions, np.fromiter(bad, dtype=np.int64, count=len(bad)))
        if not is_bad.any():
            kept[name] = ds
            continue
        skipped.update(dict.fromkeys(bad[int(i)] for i in positions[is_bad]))
        if is_bad.all():
            raise DataError(
                f"all {len(positions):,} images of the {name!r} set are missing or empty, e.g. "
                f"{bad[int(positions[0])]}; check data.root and the paths"
            )
        kept[name] = LabeledSubset(base, positions[~is_bad])
    lines = list(skipped)
    if lines and on_bad_image == "error":
        more = f"; and {len(lines) - MAX_QUOTED:,} more" if len(lines) > MAX_QUOTED else ""
        raise DataError(
            f"{len(lines):,} image file(s) are missing or empty: {'; '.join(lines[:MAX_QUOTED])}{more}; "
            f"fix or remove them, or set data.on_bad_image=skip to leave them out"
        )
    if not lines:
        return bundle, []
    train = kept.pop("train")
    return dataclasses.replace(bundle, train=train, eval_sets=kept), lines


def file_datasets(bundle: DataBundle) -> Iterator[Dataset]:
    """Each distinct file-backed dataset under the bundle's train and eval sets (subsets unwrapped)."""
    seen: set[int] = set()
    for ds in _bundle_sets(bundle).values():
        base, _ = unwrap(ds)
        if is_file_backed(base) and id(base) not in seen:
            seen.add(id(base))
            yield base


def set_skip_log(bundle: DataBundle, path: str | Path | None) -> int:
    """Set ``skip_log`` on every file-backed dataset of ``bundle``; returns how many datasets were set.

    Call before creating DataLoaders: workers receive a pickled copy of each dataset.
    """
    n = 0
    for ds in file_datasets(bundle):
        ds.skip_log = Path(path) if path is not None else None  # type: ignore[attr-defined]
        n += 1
    return n


def collate_skip_none(batch: list[Any]) -> Any:
    """torch's ``default_collate`` over the items that are not None; None when every item is None."""
    items = [item for item in batch if item is not None]
    return default_collate(items) if items else None


def list_collate(batch: list) -> list:
    """Keep samples as a list (segmentation images and labels may differ in size); skipped (None) ones dropped."""
    return [item for item in batch if item is not None]


def same_size_groups(items: list) -> list[list]:
    """``items`` (image, target) pairs as one group when all images have one size, else one group per item,
    so that each group's images can be stacked into a batch."""
    return [items] if len({tuple(img.shape) for img, _ in items}) == 1 else [[item] for item in items]
