"""The folder layouts of the street-scene datasets as released (GTA5 with ``split.mat``, SYNTHIA, Cityscapes,
BDD100K, Mapillary Vistas) read into a :class:`PairSource`: image/label pairs, files without a partner, the id
table; a wrong root is one DataError naming the layout expected and what was found."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from asg.data.images import IMG_EXTENSIONS
from asg.data.segmentation.pairs import PairTransformFn, SegmentationPairs
from asg.data.segmentation.street_classes import (
    cityscapes_lut,
    identity_lut,
    mapillary_lut,
    synthia_lut,
    trainid_lut,
)
from asg.errors import ConfigError, DataError

PREPARED_FILE = "prepared.json"  # marks a folder written by ``asg data prepare``
SOURCE_VAL = "source_val"  # eval-set name of the held-out part of the training split (as listfile/visda17)
REAL_SETS = ("cityscapes", "bdd100k", "mapillary")  # keys of data.eval_roots; their "val" split is evaluated
DATASET_NAMES = ("gta5", "synthia", "cityscapes", "bdd100k", "mapillary", "seglist")
GTA5_SPLITS = ("train", "val", "test", "all")
DEFAULT_SPLITS = {"gta5": ["all"], "synthia": ["all"]}  # others: train and val, those present
# images in the official releases, for data check warnings
OFFICIAL_COUNTS = {
    ("gta5", "all"): 24_966,
    ("gta5", "train"): 12_403,
    ("gta5", "val"): 6_382,
    ("gta5", "test"): 6_181,
    ("synthia", "all"): 9_400,
    ("synthia", "train"): 9_400,
    ("cityscapes", "train"): 2_975,
    ("cityscapes", "val"): 500,
    ("bdd100k", "train"): 7_000,
    ("bdd100k", "val"): 1_000,
    ("mapillary", "train"): 18_000,
    ("mapillary", "val"): 2_000,
}
PAIR_LIST_LAYOUT = (
    "expected one '<image path> <label path>' per line (a tab between them when a path contains spaces; "
    "relative paths are relative to the list file's folder or data.root; blank lines and '#' comments skipped)"
)


@dataclass
class PairSource:
    """Pairs of one split of a dataset, plus the files without a partner (reported by ``data check``)."""

    name: str
    root: Path
    split: str
    images: list[Path] = field(default_factory=list)
    labels: list[Path] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    lut: np.ndarray = field(default_factory=lambda: identity_lut(19))
    label_kind: str = "19-class train ids (0..18, 255)"
    label_channel: int | None = None
    images_without_label: list[Path] = field(default_factory=list)  # or, for a list, missing label files
    labels_without_image: list[Path] = field(default_factory=list)
    missing_images: list[Path] = field(default_factory=list)  # members of an official split without an image

    def dataset(self, transform: PairTransformFn | None = None, on_bad_image: str = "error") -> SegmentationPairs:
        """The pairs as a dataset (files without a partner are left out)."""
        return SegmentationPairs(
            self.images,
            self.labels,
            self.lut,
            self.label_kind,
            transform,
            self.where,
            self.label_channel,
            on_bad_image,
        )

    def require_complete(self) -> PairSource:
        """``self``; a DataError when an image has no label or the split holds no pair."""
        if self.images_without_label:
            n, first = len(self.images_without_label), self.images_without_label[0]
            raise DataError(
                f"{n:,} image(s) of {self.name} split {self.split!r} under {self.root} have no label file, e.g. "
                f"{first}; restore the labels or remove those images (asg data check {self.name} {self.root} "
                f"lists them all)"
            )
        if self.missing_images:
            n, first = len(self.missing_images), self.missing_images[0]
            raise DataError(
                f"{n:,} image(s) of {self.name} split {self.split!r} are missing from {self.root}, e.g. {first}; "
                f"the download may be incomplete"
            )
        if not self.images:
            raise DataError(f"{self.name} split {self.split!r} under {self.root} holds no image/label pair")
        return self


# ----------------------------------------------------------------------------------------------------------- files
def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files directly in ``folder`` whose names end with one of ``suffixes`` (case-insensitive), sorted."""
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.name.lower().endswith(suffixes) and not e.name.startswith("."))


def _subfolders(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_dir() and not e.name.startswith("."))


def _found(root: Path) -> str:
    """What ``root`` holds, for error messages: its first entries, or that it does not exist."""
    if not root.exists():
        return "the folder does not exist"
    if not root.is_dir():
        return "it is a file, not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not names:
        return "an empty folder"
    return ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")


def _layout_error(title: str, root: Path, expected: str, missing: Path | None = None) -> DataError:
    what = f"{missing} is missing" if missing is not None else f"{root} is not a {title} root"
    return DataError(
        f"{what}; expected {expected} (or a folder written by `asg data prepare`); found in {root}: {_found(root)}"
    )


def _pair_by_key(
    source: PairSource, images: dict[str, Path], labels: dict[str, Path], keys: list[str] | None = None
) -> PairSource:
    """Fill ``source`` with the pairs sharing a key, in key order; unmatched files go to the ``*_without_*``
    lists. ``keys``: the members of the split (default: every image); a member without an image is left to the
    caller (``missing_images``)."""
    for key in keys if keys is not None else sorted(images):
        img, lab = images.get(key), labels.get(key)
        if img is None:
            continue
        if lab is None:
            source.images_without_label.append(img)
            continue
        source.images.append(img)
        source.labels.append(lab)
        source.where.append("")
    if keys is None:
        source.labels_without_image += [p for k, p in sorted(labels.items()) if k not in images]
    return source


# ------------------------------------------------------------------------------------------------------- layouts
def gta5_split_ids(root: Path, split: str) -> list[int]:
    """1-based image numbers of ``split`` from ``root/split.mat`` (keys trainIds, valIds, testIds)."""
    path = root / "split.mat"
    if not path.is_file():
        raise DataError(
            f"GTA5 split file {path} is missing: data.split={split!r} needs the official split.mat (keys trainIds, "
            f"valIds, testIds), which comes with the GTA5 download ('read me' / code archive on the GTA5 site); "
            f"copy it to {path}, or set data.split=all to use every image"
        )
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except Exception as exc:
        raise DataError(f"cannot read GTA5 split file {path}: {type(exc).__name__}: {exc}") from None
    key = f"{split}Ids"
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"GTA5 split file {path} has no {key!r} (keys: {keys}); is it the official split.mat?")
    return sorted(int(v) for v in np.asarray(mat[key]).ravel())


def _gta5(root: Path, split: str, class_set: int) -> PairSource:
    if split not in GTA5_SPLITS:
        raise ConfigError(f"data.split for gta5 must be one of {', '.join(GTA5_SPLITS)}, got {split!r}")
    expected = f"{root}/images/NNNNN.png and {root}/labels/NNNNN.png (Cityscapes labelIds)"
    for sub in ("images", "labels"):
        if not (root / sub).is_dir():
            raise _layout_error("GTA5", root, expected, root / sub)
    src = PairSource("gta5", root, split, lut=cityscapes_lut(class_set), label_kind="Cityscapes labelIds (0..33)")
    images = {p.stem: p for p in _files(root / "images", IMG_EXTENSIONS)}
    labels = {p.stem: p for p in _files(root / "labels", (".png",))}
    if split == "all":
        return _pair_by_key(src, images, labels)
    keys = [f"{n:05d}" for n in gta5_split_ids(root, split)]
    src.missing_images = [root / "images" / f"{k}.png" for k in keys if k not in images]
    return _pair_by_key(src, images, labels, keys)


def _synthia(root: Path, split: str, class_set: int) -> PairSource:
    if split not in ("train", "all"):
        raise ConfigError(
            f"SYNTHIA-RAND-CITYSCAPES has no official {split!r} split: set data.split=all (or train, the same "
            f"9,400 images) and hold out data.source_val_fraction for validation"
        )
    expected = f"{root}/RGB/NNNNNNN.png and {root}/GT/LABELS/NNNNNNN.png (16-bit, class id in the first channel)"
    for sub in ("RGB", "GT/LABELS"):
        if not (root / sub).is_dir():
            raise _layout_error("SYNTHIA-RAND-CITYSCAPES", root, expected, root / sub)
    src = PairSource(
        "synthia", root, split, lut=synthia_lut(class_set), label_kind="SYNTHIA class ids (0..22)", label_channel=0
    )
    images = {p.stem: p for p in _files(root / "RGB", IMG_EXTENSIONS)}
    labels = {p.stem: p for p in _files(root / "GT" / "LABELS", (".png",))}
    return _pair_by_key(src, images, labels)


def _cityscapes(root: Path, split: str, class_set: int) -> PairSource:
    expected = (
        f"{root}/leftImg8bit/{split}/<city>/*_leftImg8bit.png and "
        f"{root}/gtFine/{split}/<city>/*_gtFine_labelTrainIds.png (or *_gtFine_labelIds.png)"
    )
    img_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (img_dir, gt_dir):
        if not folder.is_dir():
            raise _layout_error("Cityscapes", root, expected, folder)
    label_files = [p for city in _subfolders(gt_dir) for p in _files(city, (".png",))]
    train_ids = any(p.name.endswith("_gtFine_labelTrainIds.png") for p in label_files)
    suffix = "_gtFine_labelTrainIds.png" if train_ids else "_gtFine_labelIds.png"
    src = PairSource(
        "cityscapes",
        root,
        split,
        lut=trainid_lut(class_set) if train_ids else cityscapes_lut(class_set),
        label_kind="Cityscapes labelTrainIds (0..18, 255)" if train_ids else "Cityscapes labelIds (0..33)",
    )
    images = {
        f"{p.parent.name}/{p.name[: -len('_leftImg8bit.png')]}": p
        for city in _subfolders(img_dir)
        for p in _files(city, ("_leftimg8bit.png",))
    }
    labels = {f"{p.parent.name}/{p.name[: -len(suffix)]}": p for p in label_files if p.name.endswith(suffix)}
    return _pair_by_key(src, images, labels)


def _bdd100k(root: Path, split: str, class_set: int) -> PairSource:
    src = PairSource("bdd100k", root, split, lut=trainid_lut(class_set), label_kind="BDD100K train ids (0..18, 255)")
    new_img, new_lab = root / "images" / "10k" / split, root / "labels" / "sem_seg" / "masks" / split
    old_img, old_lab = root / "seg" / "images" / split, root / "seg" / "labels" / split
    if new_img.is_dir() and new_lab.is_dir():
        images = {p.stem: p for p in _files(new_img, IMG_EXTENSIONS)}
        labels = {p.stem: p for p in _files(new_lab, (".png",))}
    elif old_img.is_dir() and old_lab.is_dir():
        images = {p.stem: p for p in _files(old_img, IMG_EXTENSIONS)}
        labels = {p.name[: -len("_train_id.png")]: p for p in _files(old_lab, ("_train_id.png",))}
    else:
        expected = (
            f"{new_img}/*.jpg with {new_lab}/*.png (current release), or {old_img}/*.jpg with "
            f"{old_lab}/*_train_id.png (older release)"
        )
        raise _layout_error("BDD100K", root, expected, new_img if not new_img.is_dir() else new_lab)
    return _pair_by_key(src, images, labels)


def _mapillary(root: Path, split: str, class_set: int) -> PairSource:
    folders = {"train": "training", "val": "validation"}
    if split not in folders:
        raise ConfigError(f"data.split for mapillary must be train or val, got {split!r}")
    base = root / folders[split]
    expected = f"{base}/images/*.jpg and {base}/labels/*.png (v1.2 ids; or {base}/v1.2/labels/*.png)"
    lab_dir = base / "v1.2" / "labels" if (base / "v1.2" / "labels").is_dir() else base / "labels"
    for folder in (base / "images", lab_dir):
        if not folder.is_dir():
            raise _layout_error("Mapillary Vistas", root, expected, folder)
    src = PairSource(
        "mapillary", root, split, lut=mapillary_lut(class_set), label_kind="Mapillary Vistas v1.2 ids (0..65)"
    )
    images = {p.stem: p for p in _files(base / "images", IMG_EXTENSIONS)}
    labels = {p.stem: p for p in _files(lab_dir, (".png",))}
    return _pair_by_key(src, images, labels)


LAYOUTS: dict[str, Callable[[Path, str, int], PairSource]] = {
    "gta5": _gta5,
    "synthia": _synthia,
    "cityscapes": _cityscapes,
    "bdd100k": _bdd100k,
    "mapillary": _mapillary,
}


# -------------------------------------------------------------------------------------------------- list files
