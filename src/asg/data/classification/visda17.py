"""VisDA-17 classification: synthetic renderings (``train/``) -> real COCO crops (``validation/``), 12 classes."""

from __future__ import annotations

from pathlib import Path

from asg.config import DataConfig
from asg.data.bundle import DataBundle, split_source_val
from asg.data.classification.listfile import ListFileDataset
from asg.data.targets import ImagesOf
from asg.errors import ConfigError, DataError

CLASSES = [
    "aeroplane", "bicycle", "bus", "car", "horse", "knife",
    "motorcycle", "person", "plant", "skateboard", "train", "truck",
]  # fmt: skip # a table: the 12 classes in label order, six a row
# split folder -> (eval/train name, expected number of lines in the official release)
SPLITS = {"train": ("train", 152_397), "validation": ("visda17_val", 55_388)}
LIST_NAME = "image_list.txt"


def expected_tree(root: str | Path) -> str:
    """The layout VisDA-17 must have (the official ``taskcv-2017-public/classification/data`` folder)."""
    return (
        f"expected VisDA-17 layout:\n"
        f"  {root}/\n"
        f"    train/image_list.txt        152,397 lines '<path> <label 0..11>', paths relative to train/\n"
        f"    train/aeroplane/*.png ...   synthetic renderings\n"
        f"    validation/image_list.txt   55,388 lines, paths relative to validation/\n"
        f"    validation/aeroplane/*.jpg  real (COCO) crops\n"
        f"  classes 0..11: {', '.join(CLASSES)}"
    )


def list_path(root: str | Path, split: str) -> Path:
    """``root/<split>/image_list.txt``; DataError with the expected tree when the root or the list is missing."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"VisDA-17 root {root} does not exist\n{expected_tree(root)}")
    path = root / split / LIST_NAME
    if not path.is_file():
        raise DataError(f"VisDA-17 list file {path} is missing\n{expected_tree(root)}")
    return path


def build_visda17(cfg: DataConfig) -> DataBundle:
    """Train on ``train/`` minus a per-class held-out "source_val" split; test on ``validation/`` ("visda17_val")."""
    if not cfg.root:
        raise ConfigError(f"data.name=visda17 needs data.root=DIR\n{expected_tree('DIR')}")
    n, size, bad = len(CLASSES), cfg.image_size, cfg.on_bad_image
    train = ListFileDataset(list_path(cfg.root, "train"), num_classes=n, image_size=size, on_bad_image=bad)
    real = ListFileDataset(list_path(cfg.root, "validation"), num_classes=n, image_size=size, on_bad_image=bad)
    train_part, held_out = split_source_val(train, cfg.source_val_fraction, cfg.split_seed)
    eval_sets = {} if held_out is None else {"source_val": held_out}
    eval_sets["visda17_val"] = real
    # adaptation target: the same validation images, labels ignored (the usual VisDA-17 protocol)
    return DataBundle(
        train_part,
        eval_sets,
        "source_val" if held_out is not None else None,
        list(CLASSES),
        target_sets={"visda17_val": ImagesOf(real)},
        target_truth={"visda17_val": real},
    )
