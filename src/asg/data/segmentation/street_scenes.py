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
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from asg.config import DataConfig
from asg.data.bundle import DataBundle
from asg.data.segmentation.pairs import EvalPairTransform, PairTransform
from asg.data.segmentation.street_classes import (
    CLASS_SETS,
    check_class_set,
    class_names,
    identity_lut,
    make_lut,
    palette,
)
from asg.data.segmentation.street_layouts import (
    DATASET_NAMES,
    LAYOUTS,
    PAIR_LIST_LAYOUT,
    PREPARED_FILE,
    REAL_SETS,
    SOURCE_VAL,
    PairSource,
    _found,
)
from asg.errors import ConfigError, DataError


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
    src = PairSource(
        name, list_path, list_path.stem, lut=lut if lut is not None else identity_lut(19), label_kind=label_kind
    )
    for lineno, raw in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pair = parse_pair_line(raw.strip("\r\n"))
        if pair is None:
            raise DataError(
                f"{list_path}:{lineno}: expected '<image path> <label path>', got {line!r}; {PAIR_LIST_LAYOUT}"
            )
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
        raise DataError(
            f"`asg data prepare` into {root} did not finish (interrupted?): rerun the same command to "
            "complete the folder"
        )
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
        raise DataError(
            f"{list_path} is missing: {root} was prepared with the split(s) {have}; "
            f"set data.split to one of them or prepare split {split!r}"
        )
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
        what = "does not exist" if not root.exists() else f"is not a folder ({_found(root)})"
        raise DataError(f"{name} root {root} {what}")
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
