"""Generic datasets: ``<relative/path> <label>`` list files and class-subfolder image trees.

Both yield ``(FloatTensor [3, S, S] RGB in [0, 1], int)`` and expose ``labels`` without opening any image.
Every problem is a :class:`DataError` that names the file (and the list line) to fix; with
``on_bad_image="skip"`` an undecodable image yields ``None`` instead (see :mod:`asg.data.images`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from asg.config import DataConfig
from asg.data.bundle import DataBundle, DataWarning, split_source_val
from asg.data.images import (
    IMG_EXTENSIONS,
    FileImageDataset,
    Transform,
    check_bad_image_mode,
    list_images,
)
from asg.data.transforms import ResizeCrop
from asg.errors import ConfigError, DataError

LIST_LAYOUT = (
    "expected a text file with one '<relative/path/to/image> <integer label>' per line "
    "(the label is the last field, so paths may contain spaces; blank lines and '#' comments are skipped; "
    "paths are relative to the list file's folder unless a root is given)"
)


@dataclass
class ParsedList:
    """Entries of a list file (``lines`` are 1-based line numbers) and, when not strict, its errors."""

    path: Path
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def parse_list_file(list_path: str | Path, num_classes: int | None = None, strict: bool = True) -> ParsedList:
    """Read a list file. ``strict``: raise DataError at the first bad line; else collect ``FILE:LINE: ...`` errors."""
    list_path = Path(list_path)
    if not list_path.is_file():
        raise DataError(f"list file {list_path} does not exist; {LIST_LAYOUT}")
    out = ParsedList(list_path)
    try:
        text = list_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read list file {list_path}: {exc}") from None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        error = None
        parts = line.rsplit(None, 1)  # the label is the last field: the path may contain spaces
        if len(parts) != 2:
            error = f"{list_path}:{lineno}: expected '<path> <label>', got {line!r}"
        else:
            try:
                label = int(parts[1])
            except ValueError:
                label = None
                error = f"{list_path}:{lineno}: label {parts[1]!r} (the last field) is not an integer (line {line!r})"
            if label is not None and (label < 0 or (num_classes is not None and label >= num_classes)):
                allowed = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                error = f"{list_path}:{lineno}: label {label} is out of range {allowed} (line {line!r})"
        if error is not None:
            if strict:
                raise DataError(error)
            out.errors.append(error)
            continue
        out.paths.append(parts[0])
        out.labels.append(label)  # type: ignore[arg-type]
        out.lines.append(lineno)
    if strict and not out.paths:
        raise DataError(f"list file {list_path} has no entries; {LIST_LAYOUT}")
    return out


class ListFileDataset(FileImageDataset):
    """Images named by a list file; labels are read eagerly, pixels lazily.

    Args:
        list_path: text file of ``<relative/path> <label>`` lines.
        root: folder the paths are relative to (default: the list file's folder).
        transform: ``PIL.Image -> Tensor``; default resizes/crops to ``image_size`` -> [3, S, S] in [0, 1].
        num_classes: labels must lie in ``[0, num_classes)`` when given.
        on_bad_image: "error" raises on an undecodable image; "skip" returns None for it (see FileImageDataset).
    """

    def __init__(
        self,
        list_path: str | Path,
        root: str | Path | None = None,
        transform: Transform | None = None,
        num_classes: int | None = None,
        image_size: int = 224,
        on_bad_image: str = "error",
    ) -> None:
        parsed = parse_list_file(list_path, num_classes=num_classes, strict=True)
        self.list_path = parsed.path
        self.root = Path(root) if root is not None else self.list_path.parent
        self.paths = parsed.paths
        self.lines = np.asarray(parsed.lines, dtype=np.int64)
        self.labels = np.asarray(parsed.labels, dtype=np.int64)
        self.transform = transform if transform is not None else ResizeCrop(image_size)
        self.on_bad_image = check_bad_image_mode(on_bad_image)

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, i: int) -> Path:
        return self.root / self.paths[i]

    def where(self, i: int) -> str:
        return f"{self.list_path}:{self.lines[i]}"


class ImageFolderDataset(FileImageDataset):
    """``root/<class_name>/**/<image>`` like torchvision's ImageFolder, with [0, 1] output and clear errors.

    ``class_names`` fixes the label order (default: sorted subfolders); a subfolder not in it is an error,
    a class without a folder is allowed (a test set may lack classes). ``on_bad_image`` as in ListFileDataset.
    """

    def __init__(
        self,
        root: str | Path,
        class_names: list[str] | None = None,
        transform: Transform | None = None,
        image_size: int = 224,
        on_bad_image: str = "error",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist; expected {self.root}/<class_name>/<images>")
        folders = class_folders(self.root)
        self.class_names = list(class_names) if class_names is not None else folders
        unknown = sorted(set(folders) - set(self.class_names))
        if unknown:
            raise DataError(f"{self.root}: class folder(s) {unknown} are not among the classes {self.class_names}")
        self.paths: list[Path] = []
        labels: list[int] = []
        for label, name in enumerate(self.class_names):
            files = list_images(self.root / name) if (self.root / name).is_dir() else []
            self.paths.extend(files)
            labels.extend([label] * len(files))
        if not self.paths:
            raise DataError(
                f"image folder {self.root} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                f"expected {self.root}/<class_name>/<images>"
            )
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform if transform is not None else ResizeCrop(image_size)
        self.on_bad_image = check_bad_image_mode(on_bad_image)

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, i: int) -> Path:
        return self.paths[i]


def class_folders(root: Path) -> list[str]:
    """Sorted names of the non-hidden subfolders of ``root`` (the classes of an image folder)."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_folders(root: Path) -> dict[str, Path]:
    """Evaluation folders of an ``imagefolder`` root: every non-hidden subfolder except ``train``, by name."""
    return {name: root / name for name in class_folders(root) if name != "train"}


TOP_CLASS_SHARE = 0.05  # an inferred top class with fewer images than this share of the others' median is suspect
TOP_CLASS_FEW = 2  # ... or with at most this many images (and fewer than the others' median)


def top_class_warning(
    list_path: str | Path, counts: dict[int, int], eval_labels: list[set[int]] | None = None
) -> str | None:
    """A warning when the number of classes is inferred from the labels (highest id + 1) and the highest class
    looks like an off-by-one label that adds a class silently: it has at most ``TOP_CLASS_FEW`` images (or at most
    5 % of the others' median), fewer than the others' median, and no evaluation set (``eval_labels``: the labels
    of each real set, when known) has it. None otherwise."""
    if len(counts) < 2:
        return None
    top = max(counts)
    others = [n for c, n in counts.items() if c != top]
    median = float(np.median(others))
    if counts[top] > max(TOP_CLASS_FEW, TOP_CLASS_SHARE * median) or counts[top] >= median:
        return None
    if eval_labels and any(top in labels for labels in eval_labels):
        return None
    return (
        f"{list_path}: the number of classes is inferred as {top + 1} from the highest label {top}, which has "
        f"only {counts[top]:,} image(s) against a median of {median:,.0f} for the other classes: an off-by-one "
        f"label? Fix the labels, or set data.num_classes={top + 1} (or {top}) to say how many there are"
    )


def _check_class_ids(list_path: str | Path, labels: np.ndarray) -> int:
    """Number of classes of a training list whose labels must be exactly 0..K-1 (no id without an image)."""
    present = np.unique(labels)
    k = int(present[-1]) + 1
    gaps = np.setdiff1d(np.arange(k), present).tolist()
    if gaps:
        shown = ", ".join(map(str, gaps[:10])) + (f" (+{len(gaps) - 10} more)" if len(gaps) > 10 else "")
        raise DataError(
            f"{list_path}: class id(s) {shown} have no training image (labels run 0..{k - 1}); fix the labels, "
            f"or set data.num_classes (and data.class_names) if classes without training images are intended"
        )
    return k


def _class_names(cfg: DataConfig, inferred: int | None) -> list[str]:
    if cfg.class_names is not None:
        if cfg.num_classes is not None and cfg.num_classes != len(cfg.class_names):
            raise ConfigError(
                f"data.num_classes={cfg.num_classes} but data.class_names has {len(cfg.class_names)} names"
            )
        return list(cfg.class_names)
    n = cfg.num_classes if cfg.num_classes is not None else inferred
    return [str(i) for i in range(int(n or 0))]


def build_listfile(cfg: DataConfig) -> DataBundle:
    """``listfile``: ``cfg.train_list`` (synthetic, split into train/"source_val") and ``cfg.eval_lists`` (real).

    Image paths are relative to each list file's folder, or to ``cfg.root`` when set.
    """
    if not cfg.train_list:
        raise ConfigError("data.name=listfile needs data.train_list=PATH (lines '<relative/path> <label>')")
    n_cfg = cfg.num_classes if cfg.num_classes is not None else (len(cfg.class_names) if cfg.class_names else None)
    train = ListFileDataset(
        cfg.train_list, root=cfg.root, num_classes=n_cfg, image_size=cfg.image_size, on_bad_image=cfg.on_bad_image
    )
    class_names = _class_names(cfg, None if n_cfg is not None else _check_class_ids(train.list_path, train.labels))
    train_part, held_out = split_source_val(train, cfg.source_val_fraction, cfg.split_seed)
    eval_sets: dict[str, Dataset] = {}
    if held_out is not None:
        eval_sets["source_val"] = held_out
    for name, path in cfg.eval_lists.items():
        if name in eval_sets:
            raise ConfigError(f"data.eval_lists: the name {name!r} is reserved for the synthetic held-out split")
        eval_sets[name] = ListFileDataset(
            path, root=cfg.root, num_classes=len(class_names), image_size=cfg.image_size, on_bad_image=cfg.on_bad_image
        )
    if n_cfg is None:  # inferred from the labels: an off-by-one top label (absent from every real set)?
        present, n = np.unique(train.labels, return_counts=True)
        real = [
            set(np.unique(ds.labels).tolist())
            for name, ds in eval_sets.items()
            if name != "source_val" and isinstance(ds, ListFileDataset)
        ]
        warning = top_class_warning(train.list_path, dict(zip(present.tolist(), n.tolist())), real)
        if warning is not None:
            warnings.warn(warning, DataWarning, stacklevel=2)
    return DataBundle(train_part, eval_sets, "source_val" if held_out is not None else None, class_names)


def build_imagefolder(cfg: DataConfig) -> DataBundle:
    """``imagefolder``: ``cfg.root/train/<class>/...`` is synthetic; real sets are ``cfg.eval_lists``
    (name -> folder, relative to ``cfg.root`` unless absolute) or else every other subfolder of ``cfg.root``.

    Classes are the subfolders of ``train`` (sorted) unless ``cfg.class_names`` is given.
    """
    if not cfg.root:
        raise ConfigError("data.name=imagefolder needs data.root=DIR holding train/<class>/... and test folders")
    root = Path(cfg.root)
    train = ImageFolderDataset(
        root / "train", class_names=cfg.class_names, image_size=cfg.image_size, on_bad_image=cfg.on_bad_image
    )
    class_names = train.class_names
    if cfg.num_classes is not None and cfg.num_classes != len(class_names):
        raise ConfigError(f"data.num_classes={cfg.num_classes} but {root / 'train'} has {len(class_names)} classes")
    if cfg.eval_lists:
        folders = {name: root / path for name, path in cfg.eval_lists.items()}  # an absolute path stays absolute
    else:
        folders = split_folders(root)
    train_part, held_out = split_source_val(train, cfg.source_val_fraction, cfg.split_seed)
    eval_sets: dict[str, Dataset] = {} if held_out is None else {"source_val": held_out}
    for name, folder in folders.items():
        if name in eval_sets:
            raise ConfigError(f"eval set name {name!r} is reserved for the synthetic held-out split")
        eval_sets[name] = ImageFolderDataset(
            folder, class_names=class_names, image_size=cfg.image_size, on_bad_image=cfg.on_bad_image
        )
    return DataBundle(train_part, eval_sets, "source_val" if held_out is not None else None, class_names)
