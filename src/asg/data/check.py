"""``asg data check``: validate a dataset's files without training (list syntax, labels, missing images).

Existence is checked with one directory listing per folder; pixels are only decoded with ``verify_images``.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asg.data import visda17
from asg.data.listfile import open_image, parse_list_file
from asg.errors import ConfigError, DataError

MAX_LISTED = 5  # examples quoted per kind of problem


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
            lo, hi = s.get("label_range") or ("-", "-")
            line = f"  {split}: {s.get('images', 0):,} images, labels {lo}..{hi}"
            line += f", {s.get('missing_images', 0):,} missing"
            if "unreadable_images" in s:
                line += f", {s['unreadable_images']:,} unreadable"
            out.append(line + f", {s.get('bad_lines', 0):,} bad lines")
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
    listings: dict[Path, set[str] | None] = {}
    missing: list[str] = []
    unreadable: list[str] = []
    for rel, line in zip(parsed.paths, parsed.lines):
        path = base / rel
        if path.parent not in listings:
            try:
                listings[path.parent] = set(os.listdir(path.parent))
            except OSError:
                listings[path.parent] = None
        names = listings[path.parent]
        if names is None or path.name not in names:
            missing.append(f"{path} (listed at {parsed.path}:{line})")
        elif verify_images:
            try:
                open_image(path, where=f"{parsed.path}:{line}")
            except DataError as exc:
                unreadable.append(str(exc))
    if missing:
        report.errors.append(f"{len(missing):,} of {len(parsed.paths):,} images listed in {parsed.path} are missing:")
        report.errors.extend("  " + m for m in _quote(missing, "missing images", len(missing)))
    report.errors.extend(_quote(unreadable, f"unreadable images in {parsed.path}", len(unreadable)))
    counts = Counter(parsed.labels)
    n_cls = num_classes if num_classes is not None else (max(counts) + 1 if counts else 0)
    names = class_names or [str(i) for i in range(n_cls)]
    empty = [names[c] for c in range(n_cls) if counts.get(c, 0) == 0]
    if empty and parsed.paths:
        report.warnings.append(f"{parsed.path}: no images for class(es) {', '.join(empty)}")
    summary: dict[str, Any] = {
        "list": str(parsed.path),
        "images": len(parsed.paths),
        "bad_lines": len(parsed.errors),
        "missing_images": len(missing),
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
        s = check_list(report, path, num_classes=len(visda17.CLASSES), class_names=visda17.CLASSES,
                       verify_images=verify_images)  # fmt: skip
        total = s["images"] + s.get("bad_lines", 0)
        if total != official:
            report.warnings.append(f"{path}: {total:,} entries; the official release has {official:,}")
        report.summary[name] = s
    report.ok = not report.errors
    return report


def check_listfile(list_path: str | Path, verify_images: bool = False, num_classes: int | None = None) -> CheckReport:
    """Check a single ``<relative/path> <label>`` list file (paths relative to its folder)."""
    report = CheckReport(title=f"list file check of {list_path}")
    report.summary[Path(list_path).stem] = check_list(report, list_path, num_classes=num_classes,
                                                      verify_images=verify_images)  # fmt: skip
    report.ok = not report.errors
    return report


CHECKS = {"visda17": check_visda17, "listfile": check_listfile}


def check_dataset(name: str, root: str, verify_images: bool = False) -> CheckReport:
    """Check dataset ``name`` ("visda17": its root folder; "listfile": a list file path) without training."""
    if name not in CHECKS:
        raise ConfigError(f"no check for dataset {name!r}; checks exist for: {', '.join(CHECKS)}")
    return CHECKS[name](root, verify_images=verify_images)
