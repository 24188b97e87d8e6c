"""Unlabelled target-domain images for domain adaptation (``asg adapt``): an item is an image, never a label.

A target set is either one of a benchmark's ``DataBundle.target_sets`` (e.g. digits' ``mnist5k_adapt``) or a
list file / image folder named by ``adapt.target``. Items are FloatTensor [3, H, W] in [0, 1] (None for an
unreadable image with ``data.on_bad_image=skip``): classification images at ``data.image_size``, segmentation
images at ``data.eval_resize`` (native size when unset), the resolution pseudo-labels are made at.
``PseudoLabeled`` pairs the selected images with their pseudo-labels for training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from asg.config import DataConfig
from asg.data.images import FileImageDataset, check_bad_image_mode, list_images
from asg.data.transforms import ResizeCrop
from asg.errors import DataError


class ImagesOf(Dataset):
    """The images of a labelled dataset without its labels: item i is ``dataset.image(i)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        return self.dataset.image(i)


class SegImage:
    """``PIL.Image -> FloatTensor [3, h, w]`` in [0, 1], resized to ``size`` [h, w] (bilinear) when given."""

    def __init__(self, size: Sequence[int] | None) -> None:
        self.size = (int(size[0]), int(size[1])) if size else None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        arr = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        x = arr.float().div_(255.0)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.resize(x, list(self.size), antialias=True)
        return x

    def __repr__(self) -> str:
        return f"SegImage({self.size})"


class ImageFiles(FileImageDataset):
    """Unlabelled image files; ``where[i]`` says where file i is listed (``LIST:LINE``) or is empty."""

    def __init__(
        self,
        paths: list[Path],
        transform: Callable[[Image.Image], torch.Tensor],
        where: list[str] | None = None,
        on_bad_image: str = "error",
    ) -> None:
        self.paths, self.transform = paths, transform
        self._where = where or [""] * len(paths)
        self.on_bad_image = check_bad_image_mode(on_bad_image)

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, i: int) -> Path:
        return self.paths[i]

    def where(self, i: int) -> str:
        return self._where[i]

    def __getitem__(self, i: int) -> torch.Tensor | None:  # type: ignore[override]
        return self.image(i)


def read_target_files(spec: str | Path, root: str | None = None) -> tuple[list[Path], list[str], bool]:
    """(paths, where, had_labels) of a list file (first column: the image path, relative to ``root`` or the
    list's folder; further columns, e.g. labels, are ignored) or of every image under a folder."""
    path = Path(spec)
    if path.is_dir():
        paths = list_images(path)
        if not paths:
            raise DataError(f"adapt.target: the folder {path} holds no image (.jpg, .png, ...) at any depth")
        return paths, [""] * len(paths), False
    if not path.is_file():
        raise DataError(f"adapt.target: {path} is neither a target set of the benchmark nor a list file or folder")
    base = Path(root) if root else path.parent
    paths, where, had_labels = [], [], False
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        had_labels = had_labels or len(parts) > 1
        paths.append(base / parts[0])
        where.append(f"{path}:{number}")
    if not paths:
        raise DataError(f"adapt.target: the list file {path} names no image")
    return paths, where, had_labels


def target_dataset(
    spec: str, cfg: DataConfig, task: str, bundle_targets: dict[str, Dataset]
) -> tuple[Dataset, str, str | None]:
    """(unlabelled target set, its name, a note for the report or None) for ``adapt.target`` = ``spec``."""
    if spec in bundle_targets:
        return bundle_targets[spec], spec, None
    looks_like_path = "/" in spec or Path(spec).exists() or spec.endswith((".txt", ".lst"))
    if not looks_like_path:
        known = ", ".join(bundle_targets) or "none (set data.real_split=halves on the embedded benchmarks)"
        raise DataError(
            f"adapt.target: {spec!r} is not a target set of data.name={cfg.name} (its target sets: {known}) "
            "nor a list file or image folder"
        )
    paths, where, had_labels = read_target_files(spec, None)
    transform: Callable[[Image.Image], torch.Tensor]
    transform = SegImage(cfg.eval_resize) if task == "segmentation" else ResizeCrop(cfg.image_size)
    note = None
    if had_labels:
        note = f"{spec} has more than one column; only the image paths are read, the labels are ignored"
    name = Path(spec).stem if Path(spec).is_file() else Path(spec).name
    return ImageFiles(paths, transform, where, cfg.on_bad_image), name, note


class PseudoLabeled(Dataset):
    """Target images ``images[indices[j]]`` with pseudo-label ``label(j)`` (int, or LongTensor [H, W] with 255
    on pixels left out), through ``pair_transform`` (segmentation training transform) when given."""

    def __init__(
        self,
        images: Dataset,
        indices: np.ndarray,
        label: Callable[[int], Any],
        pair_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.images, self.indices, self.label, self.pair_transform = images, np.asarray(indices), label, pair_transform

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def is_random(self) -> bool:
        """True when the training transform draws random crops/scales/flips (seeded per sample by the trainer)."""
        return bool(getattr(self.pair_transform, "is_random", False))

    def __getitem__(self, j: int) -> tuple[torch.Tensor, Any] | None:
        image = self.images[int(self.indices[j])]
        if image is None:
            return None
        label = self.label(j)
        if self.pair_transform is not None:
            return self.pair_transform(image, label)
        return image, label


def split_halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(adaptation half, test half) of indices: per class, a seeded shuffle split in two (the odd one goes to
    the test half). Disjoint, class-balanced, sorted."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 31337]))
    adapt, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        adapt.append(idx[: len(idx) // 2])
        test.append(idx[len(idx) // 2 :])
    return np.sort(np.concatenate(adapt)), np.sort(np.concatenate(test))
