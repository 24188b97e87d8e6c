"""Datasets: every one yields ``(FloatTensor [3, H, W] RGB in [0, 1], int label)`` at ``cfg.image_size``.

``build_data(cfg)`` returns a :class:`DataBundle` (synthetic train set, held-out synthetic split, real test sets).
Registered benchmarks (``DATASETS``): ``digits`` (embedded, offline), ``visda17``, ``listfile``, ``imagefolder``;
segmentation (targets LongTensor [H, W], 255 = ignore): ``digit_scenes`` (embedded, offline), ``gta5``,
``synthia``, ``cityscapes``, ``bdd100k``, ``mapillary``, ``seglist`` (see docs/segmentation.md).
Layout: one subpackage per task (:mod:`asg.data.classification`, :mod:`asg.data.segmentation`); the helpers they
share (bundle, image files, checks, caches, transforms, target sets, photos) stay at this level.
Before training: :func:`warn_bundle` (one-class training set, ...) and :func:`check_bundle_files` (missing or
empty files, ``data.on_bad_image``); during training: :func:`set_skip_log` and :func:`collate_skip_none`.
"""

from __future__ import annotations

from collections.abc import Callable

from asg.config import DataConfig
from asg.data.bundle import (
    DataBundle,
    DataWarning,
    LabeledSubset,
    balanced_subset,
    split_source_val,
    stratified_split,
    warn_bundle,
)
from asg.data.check import CHECKS, CheckReport, check_dataset
from asg.data.classification import (
    ImageFolderDataset,
    ListFileDataset,
    build_digits,
    build_imagefolder,
    build_listfile,
    build_visda17,
)
from asg.data.files import SKIPPED_FILE, check_bundle_files, collate_skip_none, set_skip_log
from asg.data.images import FileImageDataset, open_image
from asg.data.photos import real_photos
from asg.data.segmentation import build_digit_scenes, build_segmentation
from asg.data.segmentation.street_check import SEG_CHECKS
from asg.errors import ConfigError

DATASETS: dict[str, Callable[[DataConfig], DataBundle]] = {
    "digits": build_digits,
    "visda17": build_visda17,
    "listfile": build_listfile,
    "imagefolder": build_imagefolder,
    "digit_scenes": build_digit_scenes,
    **dict.fromkeys(("gta5", "synthia", "cityscapes", "bdd100k", "mapillary", "seglist"), build_segmentation),
}
CHECKS.update(SEG_CHECKS)  # `asg data check gta5 ROOT`, ... (registered here: prepare imports check)
SEGMENTATION_DATASETS = ("digit_scenes", "gta5", "synthia", "cityscapes", "bdd100k", "mapillary", "seglist")


def dataset_task(name: str) -> str:
    """The task of the dataset ``name`` (a key of ``DATASETS``), as its ``DataBundle.task`` names it, without
    building it."""
    return "segmentation" if name in SEGMENTATION_DATASETS else "classification"


def build_data(cfg: DataConfig) -> DataBundle:
    """Build ``cfg.name``'s bundle with full evaluation sets.

    ``cfg.eval_max_per_set`` is not applied here: the caller caps per evaluation with :func:`balanced_subset`.
    """
    if cfg.name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {cfg.name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[cfg.name](cfg)


__all__ = [
    "DATASETS",
    "SKIPPED_FILE",
    "CheckReport",
    "DataBundle",
    "DataWarning",
    "FileImageDataset",
    "ImageFolderDataset",
    "LabeledSubset",
    "ListFileDataset",
    "balanced_subset",
    "build_data",
    "check_bundle_files",
    "check_dataset",
    "dataset_task",
    "collate_skip_none",
    "open_image",
    "real_photos",
    "set_skip_log",
    "split_source_val",
    "stratified_split",
    "warn_bundle",
]
