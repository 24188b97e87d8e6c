"""``asg data prepare`` and ``asg data check`` for the segmentation datasets.

:func:`prepare` converts a dataset's labels once to train-id PNGs (mode "L", 255 = ignore) in another folder,
with list files a ``seglist`` (or the dataset's own builder) reads. :func:`check` reports, without training,
images without labels (and the reverse), size mismatches (transposed masks too), ids outside the dataset's
table and the pixels of each class.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from asg.data.check import MAX_LISTED, CheckReport
from asg.data.files import file_problem
from asg.data.segmentation.pairs import ImageReadError, LabelIdError, SegmentationPairs, image_size, size_problem
from asg.data.segmentation.street_classes import class_names, identity_lut
from asg.data.segmentation.street_scenes import (
    LAYOUTS,
    OFFICIAL_COUNTS,
    PREPARED_FILE,
    PairSource,
    find_pairs,
    pair_list,
    read_prepared,
)
from asg.errors import ConfigError, DataError
from asg.io import atomic_write

DEFAULT_SPLITS = {"gta5": ["all"], "synthia": ["all"]}  # others: train and val, those present
PROVENANCE_FILE = "provenance.jsonl"  # one line per label written: what produced it
PROVENANCE_FORMAT = 1


# ------------------------------------------------------------------------------------------------------- prepare
@dataclass
class PrepareReport:
    """What :func:`prepare` did: labels written and skipped (already there), pairs per list, pairs left out."""

    name: str
    src: Path
    dst: Path
    class_set: int
    written: int = 0
    skipped: int = 0
    redone: dict[str, int] = field(default_factory=dict)  # why labels already in dst were converted again -> count
    lists: dict[str, int] = field(default_factory=dict)  # split -> pairs in dst/{split}.txt
    problems: list[str] = field(default_factory=list)  # pairs left out of the lists, one line each
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        verdict = "OK" if self.ok else f"{len(self.problems):,} pair(s) left out"
        out = [
            f"prepared {self.name} ({self.class_set} classes) from {self.src} into {self.dst}: {verdict}",
            f"  labels: {self.written:,} written, {self.skipped:,} skipped (already prepared)",
        ]
        if self.redone:
            why = ", ".join(f"{n:,} {reason}" for reason, n in self.redone.items())
            out.append(f"  converted again (labels already in {self.dst / 'labels'}): {why}")
        out += [f"  {self.dst / (split + '.txt')}: {n:,} pairs" for split, n in self.lists.items()]
        shown = self.problems[:MAX_LISTED]
        out += [f"  left out: {p}" for p in shown]
        if len(self.problems) > len(shown):
            out.append(f"  ... {len(self.problems) - len(shown):,} more left out")
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _list_line(image: Path, label: str) -> str:
    sep = "\t" if " " in str(image) or " " in label else " "
    return f"{image}{sep}{label}"


def _splits(name: str, src: Path, split: str) -> list[str]:
    """Splits ``prepare`` writes: ``split``, or for "all" every split the source has."""
    if split != "all":
        return [split]
    if name == "gta5":
        return ["all", "train", "val", "test"] if (src / "split.mat").is_file() else ["all"]
    if name == "synthia":
        return ["all", "train"]  # no official split: train.txt lists every pair, as data.split=train reads it
    found = []
    for sp in ("train", "val"):
        try:
            find_pairs(name, src, sp)
            found.append(sp)
        except DataError:
            continue
    if not found:
        find_pairs(name, src, "val")  # raises the layout error
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_dst(src: Path, dst: Path, name: str, class_set: int) -> dict[str, Any] | None:
    """Refuse a destination that overlaps the source or holds another complete preparation; the
    ``prepared.json`` of an interrupted preparation found in ``dst`` (None when there is none)."""
    if not src.is_dir():
        raise DataError(f"source folder {src} does not exist")
    labels = (dst / "labels").resolve()  # resolved: a symlink dst/labels -> SRC/... would write into the source
    if _inside(dst, src) or _inside(labels, src):
        where = dst if _inside(dst, src) else f"{dst / 'labels'} (a link to {labels})"
        raise DataError(f"destination {where} is inside the source {src}: prepare never writes into the source; "
                        f"choose a folder outside it")  # fmt: skip
    if _inside(src, labels):
        raise DataError(f"source {src} lies inside {dst / 'labels'}, where prepare writes; choose another dst")
    if (src / PREPARED_FILE).is_file():
        raise DataError(f"{src} is already a prepared folder ({PREPARED_FILE}); give the original dataset as src")
    if not (dst / PREPARED_FILE).is_file():
        return None
    try:
        info = json.loads((dst / PREPARED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a damaged prepared.json: rewritten, every label proven by provenance.jsonl or converted
    if info.get("complete") is False:
        return info
    same = (info.get("name"), info.get("class_set"), info.get("src")) == (name, class_set, str(src))
    if not same:
        raise DataError(
            f"{dst} already holds {info.get('name')} prepared from {info.get('src')} with class_set "
            f"{info.get('class_set')}; choose another dst or delete it"
        )
    return None


def _recipe(name: str, class_set: int, ds: SegmentationPairs) -> str:
    """What decides a prepared label besides its source file: dataset, class set, id table, label channel."""
    h = hashlib.sha256(json.dumps([PROVENANCE_FORMAT, name, class_set, ds.label_channel]).encode())
    h.update(np.ascontiguousarray(ds.lut, dtype=np.int16).tobytes())
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Provenance:
    """``dst/provenance.jsonl``: per label written, the recipe, the source file and both files' SHA-256.

    A label is appended after its file is on disk, so a kill loses at most lines of labels converted again."""

    def __init__(self, dst: Path) -> None:
        self.path = dst / PROVENANCE_FILE
        self.entries: dict[str, dict[str, Any]] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
                self.entries[entry["label"]] = entry
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill: its label is converted again

    def why_not(self, rel: str, out: Path, recipe: str, source: Path, source_sha: str) -> str | None:
        """None when ``out`` is proven to be ``source`` converted by ``recipe``; else why it must be redone."""
        entry = self.entries.get(rel)
        if entry is None:
            return "not recorded in provenance.jsonl"
        if entry.get("recipe") != recipe:
            return f"prepared with other settings (class set {entry.get('class_set')})"
        if entry.get("source") != str(source) or entry.get("source_sha256") != source_sha:
            return "from a source label that changed since"
        try:
            if _sha256(out) != entry.get("sha256"):
                return "damaged since written"
        except OSError:
            return "unreadable"
        return None

    def record(self, entry: dict[str, Any]) -> None:
        self.entries[entry["label"]] = entry
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _convert(ds: SegmentationPairs, i: int, src: Path, dst: Path, report: PrepareReport, prov: _Provenance,
             recipe: str) -> str | None:  # fmt: skip
    """Write the train-id PNG of pair ``i`` (unless provenance.jsonl proves the one there); its path relative to
    dst."""
    label = ds.label_path(i)
    out = dst / "labels" / label.relative_to(src)
    rel = out.relative_to(dst).as_posix()
    if _inside(out.parent.resolve(), src):  # a linked folder under dst/labels
        raise DataError(f"{out.parent} is a link into the source {src}: prepare never writes into the source; "
                        "remove the link")  # fmt: skip
    try:
        size = image_size(ds.image_path(i))
    except FileNotFoundError:
        report.problems.append(f"{ds.image_path(i)}: image missing")
        return None
    except Exception as exc:
        report.problems.append(f"{ds.image_path(i)}: cannot read image ({type(exc).__name__}: {exc})")
        return None
    try:
        source_sha = _sha256(label)
    except OSError as exc:
        report.problems.append(f"{label}: cannot read label ({exc.strerror or exc})")
        return None
    if out.is_file():
        why = prov.why_not(rel, out, recipe, label, source_sha)
        if why is None:
            try:
                with Image.open(out) as done:
                    if done.size == size and done.mode == "L":
                        report.skipped += 1
                        return rel
                why = "of another size than its image"
            except Exception:
                why = "unreadable"
        report.redone[why] = report.redone.get(why, 0) + 1
    try:
        ids = ds.read_label_ids(i)
    except DataError as exc:
        report.problems.append(str(exc))
        return None
    why = size_problem(size, ids.shape)
    if why is not None:
        report.problems.append(f"image {ds.image_path(i)} {why}: {label}")
        return None
    buf = io.BytesIO()
    Image.fromarray(ids, mode="L").save(buf, format="PNG")
    data = buf.getvalue()
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    prov.record({"label": rel, "recipe": recipe, "class_set": report.class_set, "source": str(label),
                 "source_sha256": source_sha, "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    report.written += 1
    return rel


def prepare(name: str, src: str | Path, dst: str | Path, *, split: str = "all", class_set: int = 19) -> PrepareReport:
    """Convert dataset ``name`` at ``src`` into train-id labels under ``dst`` (``src`` is only read).

    Writes ``dst/labels/<label path relative to src>`` (PNG mode "L", ids of ``class_set``, 255 ignore),
    ``dst/{split}.txt`` (lines ``ABS_IMAGE_PATH LABEL_PATH_RELATIVE_TO_DST``) for ``split`` or, with "all",
    every split the source has (gta5: all, plus train/val/test with split.mat; synthia: all and train; others:
    train and val), ``dst/prepared.json`` ("complete": false until the end) and ``dst/provenance.jsonl``.
    Resumable and idempotent: a label already there is kept only when provenance.jsonl proves it is this
    source file (SHA-256) converted with these settings, else it is converted again (``report.redone``).
    Pairs that cannot be converted are left out of the lists and listed in ``report.problems``.
    """
    if name not in LAYOUTS:
        raise ConfigError(f"prepare: unknown dataset {name!r}; valid names: {', '.join(LAYOUTS)}")
    src_p, dst_p = Path(src).resolve(), Path(dst).resolve()
    unfinished = _check_dst(src_p, dst_p, name, class_set)
    report = PrepareReport(name, src_p, dst_p, class_set)
    if unfinished is not None:
        settings = (unfinished.get("name"), unfinished.get("class_set"), unfinished.get("src"))
        same = settings == (name, class_set, str(src_p))
        report.notes.append(
            f"continued an interrupted prepare into {dst_p}" if same else
            f"{dst_p} held an interrupted prepare of {settings[0]} from {settings[2]} with class_set {settings[1]}: "
            "its labels were converted again"
        )  # fmt: skip
    info = {"name": name, "src": str(src_p), "class_set": class_set, "class_names": class_names(class_set),
            "labels": "train ids, PNG mode L, 255 = ignore", "provenance": PROVENANCE_FILE}  # fmt: skip
    _write_text(dst_p / PREPARED_FILE, json.dumps({**info, "complete": False}, indent=2) + "\n")
    prov = _Provenance(dst_p)
    done: dict[Path, str | None] = {}  # source label -> its prepared path (None: left out)
    counts: dict[str, int] = {}
    for sp in _splits(name, src_p, split):
        source = find_pairs(name, src_p, sp, class_set)
        report.problems += [f"{p}: no label file" for p in source.images_without_label]
        report.problems += [f"{p}: image missing (listed in the {sp} split)" for p in source.missing_images]
        if source.labels_without_image:
            n = len(source.labels_without_image)
            report.notes.append(f"{sp}: {n:,} label file(s) without an image, e.g. {source.labels_without_image[0]}")
        ds = source.dataset()
        recipe = _recipe(name, class_set, ds)
        lines = []
        for i in range(len(ds)):
            label = ds.label_path(i)
            if label not in done:
                done[label] = _convert(ds, i, src_p, dst_p, report, prov, recipe)
            rel = done[label]
            if rel is not None:
                lines.append(_list_line(ds.image_path(i), rel))
        _write_text(dst_p / f"{sp}.txt", "".join(line + "\n" for line in lines))
        report.lists[sp] = counts[sp] = len(lines)
    _write_text(dst_p / PREPARED_FILE, json.dumps({**info, "counts": counts, "complete": True}, indent=2) + "\n")
    return report


# --------------------------------------------------------------------------------------------------------- check
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
    _quote(report, f"{tag}: {len(source.images_without_label):,} image(s) without a label file:",
           [str(p) for p in source.images_without_label])  # fmt: skip
    _quote(report, f"{tag}: {len(source.missing_images):,} image(s) of the split are missing:",
           [str(p) for p in source.missing_images])  # fmt: skip
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
