"""Street-scene segmentation datasets: GTA5, SYNTHIA, Cityscapes, BDD100K, Mapillary Vistas and list files.

:func:`find_pairs` reads a dataset's own folder layout (or a folder written by ``asg data prepare``, recognised
by its ``prepared.json``) into a :class:`PairSource`: image/label pairs, the files left without a partner, and
the id table to the requested class set. :func:`build_segmentation` turns ``DataConfig`` into a
:class:`DataBundle`: the training split with :class:`PairTransform`, a held-out "source_val" part of it and the
real validation sets of ``data.eval_roots`` / ``data.eval_lists`` with :class:`EvalPairTransform`.
Nothing is downloaded; a wrong root is a DataError naming the layout expected and what was found.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from asg.config import DataConfig
from asg.data.bundle import DataBundle
from asg.data.images import IMG_EXTENSIONS
from asg.data.segmentation.pairs import EvalPairTransform, PairTransform, PairTransformFn, SegmentationPairs
from asg.data.segmentation.street_classes import (
    CLASS_SETS,
    check_class_set,
    cityscapes_lut,
    class_names,
    identity_lut,
    make_lut,
    mapillary_lut,
    palette,
    synthia_lut,
    trainid_lut,
)
from asg.errors import ConfigError, DataError

PREPARED_FILE = "prepared.json"  # marks a folder written by ``asg data prepare``
SOURCE_VAL = "source_val"  # eval-set name of the held-out part of the training split (as listfile/visda17)
REAL_SETS = ("cityscapes", "bdd100k", "mapillary")  # keys of data.eval_roots; their "val" split is evaluated
DATASET_NAMES = ("gta5", "synthia", "cityscapes", "bdd100k", "mapillary", "seglist")
GTA5_SPLITS = ("train", "val", "test", "all")
# images in the official releases, for data check warnings
OFFICIAL_COUNTS = {
    ("gta5", "all"): 24_966, ("gta5", "train"): 12_403, ("gta5", "val"): 6_382, ("gta5", "test"): 6_181,
    ("synthia", "all"): 9_400, ("synthia", "train"): 9_400,
    ("cityscapes", "train"): 2_975, ("cityscapes", "val"): 500,
    ("bdd100k", "train"): 7_000, ("bdd100k", "val"): 1_000,
    ("mapillary", "train"): 18_000, ("mapillary", "val"): 2_000,
}  # fmt: skip
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
            self.images, self.labels, self.lut, self.label_kind, transform, self.where, self.label_channel,
            on_bad_image,
        )  # fmt: skip

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
        "cityscapes", root, split,
        lut=trainid_lut(class_set) if train_ids else cityscapes_lut(class_set),
        label_kind="Cityscapes labelTrainIds (0..18, 255)" if train_ids else "Cityscapes labelIds (0..33)",
    )  # fmt: skip
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
def parse_pair_line(line: str) -> tuple[str, str] | None:
    """``'<image> <label>'`` (tab-separated when a path has spaces) -> (image, label); None when malformed."""
    parts = line.split("\t") if "\t" in line else line.split()
    parts = [p.strip() for p in parts if p.strip()]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def pair_list(
    list_path: str | Path,
    root: str | Path | None = None,
    lut: np.ndarray | None = None,
    label_kind: str = "19-class train ids (0..18, 255)",
    name: str = "seglist",
) -> PairSource:
    """Pairs named by a list file; relative paths are relative to ``root`` or the list's folder.

    Label files that do not exist go to ``images_without_label``; a malformed line is a DataError (``LIST:LINE``).
    """
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DataError(f"pair list {list_path} does not exist; {PAIR_LIST_LAYOUT}")
    base = Path(root) if root is not None else list_path.parent
    src = PairSource(name, list_path, list_path.stem, lut=lut if lut is not None else identity_lut(19),
                     label_kind=label_kind)  # fmt: skip
    for lineno, raw in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pair = parse_pair_line(raw.strip("\r\n"))
        if pair is None:
            raise DataError(f"{list_path}:{lineno}: expected '<image path> <label path>', got {line!r}; "
                            f"{PAIR_LIST_LAYOUT}")  # fmt: skip
        img, lab = base / pair[0], base / pair[1]
        if not lab.exists():
            src.images_without_label.append(img)
            continue
        src.images.append(img)
        src.labels.append(lab)
        src.where.append(f"{list_path}:{lineno}")
    return src


def read_prepared(root: Path) -> dict:
    """The ``prepared.json`` of a folder written by ``asg data prepare``."""
    path = root / PREPARED_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}; run `asg data prepare` again into this folder") from None
    if info.get("complete") is False:  # written first by prepare, set True at its end (older files lack it)
        raise DataError(f"`asg data prepare` into {root} did not finish (interrupted?): rerun the same command to "
                        "complete the folder")  # fmt: skip
    return info


def prepared_lut(prepared_set: int, class_set: int, where: str) -> np.ndarray:
    """LUT from the train ids of a prepared ``prepared_set`` to ``class_set`` (a subset of it)."""
    have, want = CLASS_SETS[prepared_set], class_names(class_set)
    if not set(want) <= set(have):
        raise DataError(
            f"{where} was prepared with class_set {prepared_set}, which lacks classes of data.class_set={class_set}; "
            f"set data.class_set={prepared_set} or prepare again with class_set {class_set}"
        )
    return make_lut({i: want.index(c) for i, c in enumerate(have) if c in want}, [*range(len(have)), 255])


def _prepared(name: str, root: Path, split: str, class_set: int) -> PairSource:
    info = read_prepared(root)
    if info.get("name") != name:
        raise DataError(f"{root} was prepared for {info.get('name')!r}, not {name!r}; set data.name accordingly")
    list_path = root / f"{split}.txt"
    if not list_path.is_file():
        have = sorted(p.stem for p in root.glob("*.txt"))
        raise DataError(f"{list_path} is missing: {root} was prepared with the split(s) {have}; "
                        f"set data.split to one of them or prepare split {split!r}")  # fmt: skip
    prepared_set = int(info.get("class_set", 19))
    lut = prepared_lut(prepared_set, class_set, str(root))
    src = pair_list(list_path, root, lut, f"{prepared_set}-class train ids (prepared)", name)
    src.root, src.split = root, split
    return src


def find_pairs(name: str, root: str | Path, split: str, class_set: int = 19) -> PairSource:
    """Pairs of ``split`` of dataset ``name`` under ``root`` (its own layout, or a prepared folder).

    Tolerant: files without a partner are listed in the result, not raised (see ``PairSource.require_complete``).
    """
    check_class_set(class_set)
    if name not in LAYOUTS:
        raise ConfigError(f"unknown segmentation dataset {name!r}; valid names: {', '.join(LAYOUTS)}")
    root = Path(root)
    if (root / PREPARED_FILE).is_file():
        return _prepared(name, root, split, class_set)
    if not root.is_dir():
        raise DataError(f"{name} root {root} does not exist; {_found(root)}")
    return LAYOUTS[name](root, split, class_set)


# ------------------------------------------------------------------------------------------------------ builders
def split_held_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) sorted index arrays: ``round(fraction * n)`` random pairs held out, deterministic for
    ``seed`` (at least one pair is kept)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.source_val_fraction must be in [0, 1), got {fraction}")
    n_held = min(int(round(fraction * n)), n - 1)
    if n_held <= 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7919]))
    held = np.sort(rng.permutation(n)[:n_held])
    return np.setdiff1d(np.arange(n), held), held


def _seglist_names(cfg: DataConfig) -> list[str]:
    """Class names of a seglist: data.class_names, else a prepared.json beside the train list, else class_set."""
    if cfg.class_names:
        return list(cfg.class_names)
    if cfg.train_list and (Path(cfg.train_list).parent / PREPARED_FILE).is_file():
        names = read_prepared(Path(cfg.train_list).parent).get("class_names")
        if names:
            return list(names)
    return class_names(cfg.class_set)


def build_segmentation(cfg: DataConfig) -> DataBundle:
    """Bundle of a segmentation benchmark (``data.name`` in gta5, synthia, cityscapes, bdd100k, mapillary, seglist).

    Train: ``data.root`` split ``data.split`` (seglist: ``data.train_list``) with :class:`PairTransform`, minus a
    random ``source_val_fraction`` held out as "source_val" (seeded by ``split_seed``). Evaluation: the "val"
    split of each ``data.eval_roots`` entry (key cityscapes | bdd100k | mapillary, also the set's name) and each
    ``data.eval_lists`` list (labels in train ids), with :class:`EvalPairTransform`.
    """
    class_set = check_class_set(cfg.class_set)
    if cfg.name == "seglist":
        if not cfg.train_list:
            raise ConfigError("data.name=seglist needs data.train_list=PATH (lines '<image path> <label path>')")
        names = _seglist_names(cfg)
        lut, kind = identity_lut(len(names)), f"{len(names)}-class train ids (0..{len(names) - 1}, 255)"
        source = pair_list(cfg.train_list, cfg.root, lut, kind).require_complete()
    else:
        if cfg.name not in LAYOUTS:
            raise ConfigError(f"data.name={cfg.name!r} is not a segmentation dataset ({', '.join(DATASET_NAMES)})")
        if not cfg.root:
            raise ConfigError(f"data.name={cfg.name} needs data.root=DIR (the dataset's folder)")
        names = class_names(class_set)
        source = find_pairs(cfg.name, cfg.root, cfg.split, class_set).require_complete()
    base = source.dataset(None, cfg.on_bad_image)
    train_tf = PairTransform(cfg.train_resize, cfg.scale_range, cfg.crop_size, cfg.flip)
    eval_tf = EvalPairTransform(cfg.eval_resize)
    keep, held = split_held_out(len(base), cfg.source_val_fraction, cfg.split_seed)
    eval_sets: dict[str, Dataset] = {}
    if len(held):
        eval_sets[SOURCE_VAL] = base.select(held, eval_tf)
    for key, root in cfg.eval_roots.items():
        if key not in REAL_SETS:
            raise ConfigError(f"data.eval_roots: unknown real set {key!r}; valid keys: {', '.join(REAL_SETS)}")
        if not Path(root).exists():
            raise DataError(f"data.eval_roots.{key}: {root} does not exist; point it at the {key} folder")
        eval_sets[key] = find_pairs(key, root, "val", class_set).require_complete().dataset(eval_tf, cfg.on_bad_image)
    for key, path in cfg.eval_lists.items():
        if key in eval_sets:
            raise ConfigError(f"data.eval_lists: the name {key!r} is already taken (source_val or data.eval_roots)")
        lut = identity_lut(len(names))
        kind = f"{len(names)}-class train ids (0..{len(names) - 1}, 255)"
        eval_sets[key] = pair_list(path, cfg.root, lut, kind).require_complete().dataset(eval_tf, cfg.on_bad_image)
    known = next((cs for cs, cs_names in CLASS_SETS.items() if cs_names == names), None)
    return DataBundle(
        train=base.select(keep, train_tf),
        eval_sets=eval_sets,
        source_val_name=SOURCE_VAL if len(held) else None,
        class_names=list(names),
        has_augmentation=train_tf.is_random,
        task="segmentation",
        palette=palette(known) if known is not None else None,
    )
