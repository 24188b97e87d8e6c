"""``asg data prepare`` and ``asg data check`` for the segmentation datasets.

:func:`prepare` converts a dataset's labels once to train-id PNGs (mode "L", 255 = ignore) in another folder,
with list files a ``seglist`` (or the dataset's own builder) reads. :func:`check` reports, without training,
images without labels (and the reverse), size mismatches (transposed masks too), ids outside the dataset's
table and the pixels of each class.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from asg.data.check import MAX_LISTED
from asg.data.segmentation.pairs import SegmentationPairs, image_size, size_problem
from asg.data.segmentation.street_classes import class_names
from asg.data.segmentation.street_scenes import (
    LAYOUTS,
    PREPARED_FILE,
    find_pairs,
)
from asg.errors import ConfigError, DataError
from asg.io import atomic_write, sha256_file

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
        raise DataError(
            f"destination {where} is inside the source {src}: prepare never writes into the source; "
            f"choose a folder outside it"
        )
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
            if sha256_file(out) != entry.get("sha256"):
                return "damaged since written"
        except OSError:
            return "unreadable"
        return None

    def record(self, entry: dict[str, Any]) -> None:
        self.entries[entry["label"]] = entry
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _convert(
    ds: SegmentationPairs, i: int, src: Path, dst: Path, report: PrepareReport, prov: _Provenance, recipe: str
) -> str | None:
    """Write the train-id PNG of pair ``i`` (unless provenance.jsonl proves the one there); its path relative to
    dst."""
    label = ds.label_path(i)
    out = dst / "labels" / label.relative_to(src)
    rel = out.relative_to(dst).as_posix()
    if _inside(out.parent.resolve(), src):  # a linked folder under dst/labels
        raise DataError(
            f"{out.parent} is a link into the source {src}: prepare never writes into the source; remove the link"
        )
    try:
        size = image_size(ds.image_path(i))
    except FileNotFoundError:
        report.problems.append(f"{ds.image_path(i)}: image missing")
        return None
    except Exception as exc:
        report.problems.append(f"{ds.image_path(i)}: cannot read image ({type(exc).__name__}: {exc})")
        return None
    try:
        source_sha = sha256_file(label)
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
    prov.record(
        {
            "label": rel,
            "recipe": recipe,
            "class_set": report.class_set,
            "source": str(label),
            "source_sha256": source_sha,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    )
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
            f"continued an interrupted prepare into {dst_p}"
            if same
            else f"{dst_p} held an interrupted prepare of {settings[0]} from {settings[2]} "
            f"with class_set {settings[1]}: its labels were converted again"
        )
    info = {
        "name": name,
        "src": str(src_p),
        "class_set": class_set,
        "class_names": class_names(class_set),
        "labels": "train ids, PNG mode L, 255 = ignore",
        "provenance": PROVENANCE_FILE,
    }
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
