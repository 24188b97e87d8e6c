"""``asg data check``: validate a dataset's files without training (list syntax, labels, missing/empty images).

Each file is checked with one ``os.stat`` (missing, empty); pixels are only decoded with ``verify_images``.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asg.data.classification import visda17
from asg.data.classification.listfile import (
    LIST_LAYOUT,
    class_folders,
    parse_list_file,
    split_folders,
    top_class_warning,
)
from asg.data.files import file_problem
from asg.data.images import IMG_EXTENSIONS, links_note, open_image, walk_images
from asg.errors import ConfigError, DataError

MAX_LISTED = 5  # examples quoted per kind of problem
# summary counts shown by CheckReport.format, in this order
COUNTED = (
    ("missing_images", "missing"),
    ("empty_files", "empty"),
    ("unreadable_images", "unreadable"),
    ("bad_lines", "bad lines"),
)


@dataclass
class CheckReport:
    """Outcome of a check: ``ok`` is False when there are errors; ``summary`` holds counts per split."""

    ok: bool = True
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    title: str = "dataset check"

    def format(self) -> str:
        """Human-readable report: verdict, errors, warnings, then per-split counts and per-class counts."""
        verdict = "OK" if self.ok else "FAILED"
        out = [f"{self.title}: {verdict} ({len(self.errors)} errors, {len(self.warnings)} warnings)"]
        out += [f"  error: {e}" for e in self.errors] + [f"  warning: {w}" for w in self.warnings]
        for split, s in self.summary.items():
            if not isinstance(s, dict):
                continue
            line = f"  {split}: {s.get('images', 0):,} images"
            if "label_range" in s:
                lo, hi = s["label_range"] or ("-", "-")
                line += f", labels {lo}..{hi}"
            for key, word in COUNTED:
                if key in s:
                    line += f", {s[key]:,} {word}"
            out.append(line)
            if s.get("per_class"):
                out.append("    " + ", ".join(f"{k} {v:,}" for k, v in s["per_class"].items()))
        return "\n".join(out)


def _quote(problems: list[str], what: str, total: int) -> list[str]:
    head = problems[:MAX_LISTED]
    if total > len(head):
        head.append(f"... {total - len(head):,} more {what}")
    return head


def check_list(
    report: CheckReport,
    list_path: str | Path,
    root: str | Path | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    verify_images: bool = False,
) -> dict[str, Any]:
    """Check one list file, appending to ``report``; returns its summary (counts, label range, per class)."""
    try:
        parsed = parse_list_file(list_path, num_classes=num_classes, strict=False)
    except DataError as exc:
        report.errors.append(str(exc))
        return {"list": str(list_path), "images": 0}
    base = Path(root) if root is not None else parsed.path.parent
    report.errors.extend(_quote(parsed.errors, f"bad lines in {parsed.path}", len(parsed.errors)))
    if not parsed.paths and not parsed.errors:
        report.errors.append(f"list file {parsed.path} has no entries; {LIST_LAYOUT}")
    missing: list[str] = []
    unusable: list[str] = []  # empty (0 bytes) or not a regular file
    unreadable: list[str] = []
    for rel, line in zip(parsed.paths, parsed.lines):
        path = base / rel
        why = file_problem(path)
        if why == "missing":
            missing.append(f"{path} (listed at {parsed.path}:{line})")
        elif why is not None:
            unusable.append(f"{path}: {why} (listed at {parsed.path}:{line})")
        elif verify_images:
            try:
                open_image(path, where=f"{parsed.path}:{line}")
            except DataError as exc:
                unreadable.append(str(exc))
    n = len(parsed.paths)
    for found, what in ((missing, "missing"), (unusable, "empty or not files")):
        if found:
            report.errors.append(f"{len(found):,} of {n:,} images listed in {parsed.path} are {what}:")
            report.errors.extend("  " + m for m in _quote(found, f"{what} images", len(found)))
    report.errors.extend(_quote(unreadable, f"unreadable images in {parsed.path}", len(unreadable)))
    counts = Counter(parsed.labels)
    n_cls = num_classes if num_classes is not None else (max(counts) + 1 if counts else 0)
    names = class_names or [str(i) for i in range(n_cls)]
    empty = [names[c] for c in range(n_cls) if counts.get(c, 0) == 0]
    if empty and parsed.paths:
        report.warnings.append(f"{parsed.path}: no images for class(es) {', '.join(empty)}")
    top = top_class_warning(parsed.path, dict(counts)) if num_classes is None and class_names is None else None
    if top is not None:
        report.warnings.append(top)
    summary: dict[str, Any] = {
        "list": str(parsed.path),
        "images": len(parsed.paths),
        "bad_lines": len(parsed.errors),
        "missing_images": len(missing),
        "empty_files": len(unusable),
        "label_range": [min(counts), max(counts)] if counts else None,
        "per_class": {names[c] if c < len(names) else str(c): counts.get(c, 0) for c in range(max(n_cls, 0))},
    }
    if verify_images:
        summary["unreadable_images"] = len(unreadable)
    return summary


def check_visda17(root: str | Path, verify_images: bool = False) -> CheckReport:
    """Check ``root/{train,validation}/image_list.txt`` and the images they list (see ``visda17.expected_tree``)."""
    report = CheckReport(title=f"VisDA-17 check of {root}")
    for split, (name, official) in visda17.SPLITS.items():
        try:
            path = visda17.list_path(root, split)
        except DataError as exc:
            report.errors.append(str(exc))
            if not Path(root).is_dir():
                break
            continue
        s = check_list(
            report, path, num_classes=len(visda17.CLASSES), class_names=visda17.CLASSES, verify_images=verify_images
        )
        total = s["images"] + s.get("bad_lines", 0)
        if total != official:
            report.warnings.append(f"{path}: {total:,} entries; the official release has {official:,}")
        report.summary[name] = s
    report.ok = not report.errors
    return report


def check_listfile(list_path: str | Path, verify_images: bool = False, num_classes: int | None = None) -> CheckReport:
    """Check a single ``<relative/path> <label>`` list file (paths relative to its folder)."""
    report = CheckReport(title=f"list file check of {list_path}")
    report.summary[Path(list_path).stem] = check_list(
        report, list_path, num_classes=num_classes, verify_images=verify_images
    )
    report.ok = not report.errors
    return report


def check_folder(
    report: CheckReport, folder: Path, class_names: list[str] | None = None, verify_images: bool = False
) -> dict[str, Any]:
    """Check one ``folder/<class>/**/<image>`` split, appending to ``report``; returns its summary.

    ``class_names``: the training classes an evaluation split's folders must be among (None for the train split).
    """
    classes = class_folders(folder)
    unknown = sorted(set(classes) - set(class_names)) if class_names is not None else []
    if unknown:
        report.errors.append(f"{folder}: class folder(s) {unknown} are not among the training classes {class_names}")
    loose = [p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMG_EXTENSIONS)]
    if loose:
        report.warnings.append(f"{folder}: {len(loose):,} image(s) outside class folders are ignored, e.g. {loose[0]}")
    per_class: dict[str, int] = {}
    bad: list[str] = []
    unreadable: list[str] = []
    for name in classes:
        files, links = walk_images(folder / name)
        if links:
            report.warnings.append(f"{folder / name}: {links_note(links)}")
        per_class[name] = len(files)
        if not files:
            report.warnings.append(f"{folder / name}: class folder holds no images")
        for path in files:
            why = file_problem(path)
            if why is not None:
                bad.append(f"{path}: {why}")
            elif verify_images:
                try:
                    open_image(path)
                except DataError as exc:
                    unreadable.append(str(exc))
    total = sum(per_class.values())
    if total == 0:
        report.errors.append(
            f"image folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)}); "
            f"expected {folder}/<class_name>/<images>"
        )
    if bad:
        report.errors.append(f"{len(bad):,} of {total:,} images in {folder} are empty or not files:")
        report.errors.extend("  " + b for b in _quote(bad, "empty files", len(bad)))
    report.errors.extend(_quote(unreadable, f"unreadable images in {folder}", len(unreadable)))
    summary: dict[str, Any] = {"folder": str(folder), "images": total, "empty_files": len(bad), "per_class": per_class}
    if verify_images:
        summary["unreadable_images"] = len(unreadable)
    return summary


def check_imagefolder(root: str | Path, verify_images: bool = False) -> CheckReport:
    """Check an ``imagefolder`` dataset: ``root/train/<class>/...`` plus every other subfolder as an evaluation
    split (as ``build_imagefolder`` reads it), or, without ``root/train``, ``root/<class>/...`` as a single split.

    Errors: no images in a split, empty (0-byte) files, unknown class folders, undecodable images
    (``verify_images``). Warnings: empty class folders, images outside class folders.
    """
    root = Path(root)
    report = CheckReport(title=f"image folder check of {root}")
    if not root.is_dir():
        report.errors.append(
            f"image folder {root} does not exist; expected {root}/train/<class>/<images> plus test folders "
            f"{root}/<split>/<class>/<images>, or {root}/<class>/<images>"
        )
        report.ok = False
        return report
    layered = (root / "train").is_dir()
    splits = {"train": root / "train", **split_folders(root)} if layered else {root.name: root}
    train_classes = class_folders(root / "train") if layered else None
    for name, folder in splits.items():
        report.summary[name] = check_folder(
            report, folder, None if folder == root / "train" else train_classes, verify_images
        )
    report.ok = not report.errors
    return report


CHECKS: dict[str, Callable[..., CheckReport]] = {
    "visda17": check_visda17,
    "listfile": check_listfile,
    "imagefolder": check_imagefolder,
}


def check_dataset(name: str, root: str, verify_images: bool = False, **options: object) -> CheckReport:
    """Check dataset ``name`` without training: "visda17", "imagefolder" and the segmentation datasets take the
    root folder, "listfile" and "seglist" the list file. ``options`` (segmentation only): ``split``,
    ``class_set``, ``max_items``."""
    if name not in CHECKS:
        raise ConfigError(f"no check for dataset {name!r}; checks exist for: {', '.join(CHECKS)}")
    check = CHECKS[name]
    func = getattr(check, "func", check)  # (segmentation checks are partials)
    accepted = set(inspect.signature(func).parameters)
    unknown = [k for k in options if k not in accepted]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(func).parameters.values()):
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(f"{flags}: not an option of the {name} check")
    return check(root, verify_images=verify_images, **options)
