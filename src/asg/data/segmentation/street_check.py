"""``asg data check`` for the street-scene datasets: every pair of a split opened (or a sample of them), sizes,
label ids and files without a partner reported, one line each, with the layout that was expected."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from asg.data.check import MAX_LISTED, CheckReport
from asg.data.files import file_problem
from asg.data.segmentation.pairs import ImageReadError, LabelIdError, image_size, size_problem
from asg.data.segmentation.street_classes import class_names, identity_lut
from asg.data.segmentation.street_layouts import DEFAULT_SPLITS, LAYOUTS, OFFICIAL_COUNTS, PREPARED_FILE, PairSource
from asg.data.segmentation.street_scenes import find_pairs, pair_list, read_prepared
from asg.errors import ConfigError, DataError


def _quote(report: CheckReport, header: str, items: list[str]) -> None:
    if items:
        report.errors.append(header)
        report.errors += ["  " + x for x in items[:MAX_LISTED]]
        if len(items) > MAX_LISTED:
            report.errors.append(f"  ... {len(items) - MAX_LISTED:,} more")


def sample_indices(n: int, max_items: int | None) -> np.ndarray:
    """All of ``range(n)``, or ``max_items`` evenly spaced indices of it (deterministic)."""
    if max_items is None or n <= max_items:
        return np.arange(n)
    if max_items <= 0:
        raise ConfigError(f"max_items must be positive, got {max_items}")
    return np.unique(np.linspace(0, n - 1, max_items).round().astype(np.int64))


def check_source(
    report: CheckReport, source: PairSource, names: list[str], max_items: int | None = None, verify: bool = False
) -> dict[str, Any]:
    """Check the pairs of one split, appending errors to ``report``; returns its summary (counts, pixels)."""
    tag = f"{source.name} {source.split}"
    n = len(source.images)
    if n == 0 and not source.images_without_label and not source.missing_images:
        report.errors.append(f"{tag}: {source.root} lists no image/label pair (training refuses an empty split)")
    _quote(
        report,
        f"{tag}: {len(source.images_without_label):,} image(s) without a label file:",
        [str(p) for p in source.images_without_label],
    )
    _quote(
        report,
        f"{tag}: {len(source.missing_images):,} image(s) of the split are missing:",
        [str(p) for p in source.missing_images],
    )
    if source.labels_without_image:
        k = len(source.labels_without_image)
        report.warnings.append(f"{tag}: {k:,} label file(s) without an image, e.g. {source.labels_without_image[0]}")
    official = OFFICIAL_COUNTS.get((source.name, source.split))
    total = n + len(source.images_without_label)
    if official is not None and total != official and not str(source.root).endswith(".txt"):
        report.warnings.append(f"{tag}: {total:,} images; the official release has {official:,}")
    ds = source.dataset()
    idx = sample_indices(n, max_items)
    missing, empty, unreadable, mismatched, bad_ids = [], [], [], [], []  # type: ignore[var-annotated]
    pixels = np.zeros(256, dtype=np.int64)
    for i in idx.tolist():
        paths = (ds.image_path(i), ds.label_path(i))
        problems = [(p, file_problem(p)) for p in paths]
        if any(why is not None for _, why in problems):
            for p, why in problems:
                if why == "missing":
                    missing.append(f"{p} ({ds.describe(i)})")
                elif why is not None:
                    empty.append(f"{p}: {why}")
            continue
        try:
            size = image_size(paths[0], verify=verify)
        except Exception as exc:
            unreadable.append(f"{paths[0]}: {type(exc).__name__}: {exc}")
            continue
        try:
            ids = ds.read_label_ids(i)
        except LabelIdError as exc:
            bad_ids.append(str(exc))
            continue
        except ImageReadError as exc:
            unreadable.append(str(exc))
            continue
        why = size_problem(size, ids.shape)
        if why is not None:
            mismatched.append(f"image {paths[0]} {why}: {paths[1]}")
            continue
        pixels += np.bincount(ids.ravel(), minlength=256)[:256]
    checked = len(idx)
    _quote(report, f"{tag}: {len(missing):,} of {checked:,} checked pairs have a missing file:", missing)
    _quote(report, f"{tag}: {len(empty):,} empty files or not files:", empty)
    _quote(report, f"{tag}: {len(unreadable):,} unreadable files:", unreadable)
    _quote(report, f"{tag}: {len(mismatched):,} image/label size mismatches:", mismatched)
    _quote(report, f"{tag}: {len(bad_ids):,} labels with ids outside {source.label_kind}:", bad_ids)
    per_class = {c: int(pixels[k]) for k, c in enumerate(names)}
    absent = [c for c, v in per_class.items() if v == 0]
    if absent and checked > len(missing) + len(empty) + len(unreadable) + len(mismatched) + len(bad_ids):
        report.warnings.append(f"{tag}: no pixels of class(es) {', '.join(absent)} in the checked pairs")
    if checked < n:
        report.warnings.append(f"{tag}: checked {checked:,} of {n:,} pairs (evenly spaced sample)")
    return {
        "root": str(source.root),
        "images": n,
        "checked": checked,
        "missing_labels": len(source.images_without_label),
        "missing_images": len(missing) + len(source.missing_images),
        "empty_files": len(empty),
        "unreadable_images": len(unreadable),
        "size_mismatches": len(mismatched),
        "bad_ids": len(bad_ids),
        "ignored_pixels": int(pixels[255]),
        "per_class": per_class,
    }


def check(
    name: str,
    root: str | Path,
    split: str | None = None,
    *,
    class_set: int = 19,
    max_items: int | None = None,
    verify_images: bool = False,
    num_classes: int | None = None,
) -> CheckReport:
    """Check a segmentation dataset without training; ``report.ok`` is False when there are errors.

    ``name``: gta5, synthia, cityscapes, bdd100k, mapillary (``root``: the dataset's folder or a prepared one) or
    seglist (``root``: the list file). ``split`` None: gta5/synthia "all", the others train and val (those
    present; a prepared folder: every list). ``max_items``: check at most this many evenly spaced pairs per split
    (per-class pixel counts then cover the sample). ``verify_images``: decode image pixels, not only headers.
    ``num_classes`` (seglist only): ids must lie in 0..num_classes-1 (or be 255), instead of ``class_set``'s.
    """
    sampled = f", at most {max_items:,} pairs per split" if max_items is not None else ""
    report = CheckReport(title=f"{name} check of {root} (pixels per class{sampled})")
    names = class_names(class_set)
    root = Path(root)
    if num_classes is not None:
        if name != "seglist":
            raise ConfigError(f"--num-classes is for seglist (and listfile) checks; {name} uses --class-set")
        if not 1 <= num_classes <= 255:
            raise ConfigError(f"--num-classes must be in [1, 255] (255 = ignore), got {num_classes}")
        names = [str(i) for i in range(num_classes)]
    if name == "seglist":
        try:
            sources = [pair_list(root, None, identity_lut(len(names)), f"{len(names)}-class train ids")]
        except DataError as exc:
            report.errors.append(str(exc))
            sources = []
    elif name not in LAYOUTS:
        raise ConfigError(f"no check for dataset {name!r}; segmentation checks: {', '.join([*LAYOUTS, 'seglist'])}")
    else:
        if split is not None:
            splits = [split]
        elif (root / PREPARED_FILE).is_file():
            try:
                read_prepared(root)  # refuses a folder whose prepare did not finish
            except DataError as exc:
                report.errors.append(str(exc))
            splits = sorted(p.stem for p in root.glob("*.txt"))
            if not splits:
                report.errors.append(f"{root} holds {PREPARED_FILE} but no list file (<split>.txt)")
        else:
            splits = DEFAULT_SPLITS.get(name, ["train", "val"])
        sources, failed = [], []
        for sp in splits:
            try:
                sources.append(find_pairs(name, root, sp, class_set))
            except DataError as exc:
                if str(exc) not in failed:  # a missing root: the same line for every split, said once
                    failed.append(str(exc))
        if sources and split is None:  # an absent default split is not an error when another is there
            report.warnings += failed
        else:
            report.errors += failed
    for source in sources:
        key = source.split if source.split not in report.summary else str(source.root)
        report.summary[key] = check_source(report, source, names, max_items, verify_images)
    report.ok = not report.errors
    return report


def _check_entry(name: str, root: str, verify_images: bool = False, **options: Any) -> CheckReport:
    return check(name, root, verify_images=verify_images, **options)


# ``asg data check NAME ROOT`` entries, in the signature of ``asg.data.check.CHECKS``
SEG_CHECKS: dict[str, Callable[..., CheckReport]] = {
    n: functools.partial(_check_entry, n) for n in (*LAYOUTS, "seglist")
}
