"""Reading image files: decoding (EXIF orientation, 16-bit gray), and the base class of file-backed datasets.

A :class:`FileImageDataset` exposes ``labels`` [N] and ``image_path(i)`` without opening any image. With
``on_bad_image="skip"`` an item that fails to decode is returned as ``None`` (drop it with
``asg.data.files.collate_skip_none``) and its line ``PATH: reason`` is appended to ``skip_log``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from asg.errors import ConfigError, DataError

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
BAD_IMAGE_MODES = ("error", "skip")
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I")  # 16-bit (or 32-bit int) grayscale

Transform = Callable[[Image.Image], torch.Tensor]


class ImageReadError(DataError):
    """An image that is missing or cannot be decoded; ``path`` and ``reason`` feed the skip log."""

    def __init__(self, message: str, path: str | Path, reason: str) -> None:
        super().__init__(message)
        self.path, self.reason = Path(path), reason


def wide_gray_to_l(img: Image.Image) -> Image.Image:
    """16-bit gray ("I;16*", or "I" with max <= 65535) -> "L" as ``round(v * 255 / 65535)``.

    An "I" image with larger values is scaled by its own maximum instead; negative values become 0.
    """
    arr = np.asarray(img).astype(np.float64)
    top = max(65535.0, float(arr.max(initial=0.0)))
    return Image.fromarray(np.rint(np.clip(arr, 0.0, None) * (255.0 / top)).astype(np.uint8))


class NonFiniteImage(ValueError):
    """A float image with NaN or infinite pixels (no gray level to give them)."""


# TIFF tags SMinSampleValue / SMaxSampleValue: the range a float image declares
_TIFF_RANGE_TAGS = (340, 341)


def float_gray_to_l(img: Image.Image) -> Image.Image:
    """A float gray image (PIL mode "F", e.g. a float32 TIFF) -> "L", scaled by its range: the declared one (TIFF
    SMinSampleValue/SMaxSampleValue) when given, else the observed one: [0, 1], [0, 255] or [0, 65535] when the
    values fit in it, else [0, max] (negative values: [min, max]). NonFiniteImage for NaN or infinite pixels."""
    arr = np.asarray(img, dtype=np.float64)
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise NonFiniteImage(
            f"{bad:,} of {arr.size:,} pixels are NaN or infinite (a float image); fix or remove the file"
        )
    tags = getattr(img, "tag_v2", {})
    raw = [tags.get(t) for t in _TIFF_RANGE_TAGS]
    declared = [
        float(v) for v in (r[0] if isinstance(r, tuple) and r else r for r in raw) if isinstance(v, (int, float))
    ]
    if len(declared) == 2 and declared[1] > declared[0]:
        lo, hi = declared
    else:
        lo = min(0.0, float(arr.min(initial=0.0)))
        top = float(arr.max(initial=0.0))
        hi = next((r for r in (1.0, 255.0, 65535.0) if top <= r), top) if lo == 0.0 else top
        if hi <= lo:
            hi = lo + 1.0
    return Image.fromarray(np.rint(np.clip((arr - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8))


def read_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully, upright (EXIF orientation applied), as "L" (gray) or "RGB". Raises what PIL raises,
    and NonFiniteImage for a float image with NaN or infinite pixels."""
    with Image.open(path) as img:
        img.load()
        with contextlib.suppress(Exception):  # a malformed EXIF block: the pixels are fine, keep them as stored
            ImageOps.exif_transpose(img, in_place=True)
        if img.mode in WIDE_GRAY_MODES:
            return wide_gray_to_l(img)
        if img.mode == "F" or img.mode.startswith("F;"):
            return float_gray_to_l(img)
        return img.convert("L") if img.mode in ("1", "L") else img.convert("RGB")


def open_image(path: str | Path, where: str = "") -> Image.Image:
    """:func:`read_image`; an :class:`ImageReadError` (a DataError) names the file and ``where`` it was listed."""
    suffix = f" (listed at {where})" if where else ""
    try:
        return read_image(path)
    except FileNotFoundError:
        raise ImageReadError(f"image file {path} does not exist{suffix}", path, f"does not exist{suffix}") from None
    except Exception as exc:  # PIL raises many types for corrupt/truncated files
        why = str(exc) if isinstance(exc, NonFiniteImage) else f"{type(exc).__name__}: {exc}"
        msg = f"cannot read image {path}{suffix}: {why}"
        raise ImageReadError(msg, path, f"cannot decode{suffix}: {why}") from None


def check_bad_image_mode(mode: str) -> str:
    """``mode`` if it is "error" or "skip", else a ConfigError."""
    if mode not in BAD_IMAGE_MODES:
        raise ConfigError(f"data.on_bad_image must be one of {', '.join(BAD_IMAGE_MODES)}, got {mode!r}")
    return mode


def walk_images(folder: str | Path) -> tuple[list[Path], list[str]]:
    """(image files by extension anywhere under ``folder``, sorted; the symlinks not followed, as ``LINK -> TARGET``).

    Symlinked folders are followed, but each real folder is read once: a link back to a folder above it (a loop,
    e.g. ``c0/up -> ..``, which would list the whole tree again and the other classes' images under this one) or
    to a folder already read (a second path to the same images) is not followed, and is returned.
    """
    root = os.path.realpath(folder)
    seen: set[str] = set()
    images: list[Path] = []
    skipped: list[str] = []
    for d, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(d)
        seen.add(real)
        images.extend(Path(d) / f for f in files if f.lower().endswith(IMG_EXTENSIONS))
        kept = []
        for name in sorted(dirs, key=lambda n: os.path.islink(os.path.join(d, n))):  # real folders first
            path = os.path.join(d, name)
            target = os.path.realpath(path)
            prefix = target.rstrip(os.sep) + os.sep
            above = real.startswith(prefix) or root.startswith(prefix)  # a folder above this one or the walk's root
            if target in seen or above:
                if os.path.islink(path):
                    skipped.append(f"{path} -> {os.readlink(path)}")
                continue
            seen.add(target)
            kept.append(name)
        dirs[:] = kept
    return sorted(images), skipped


def links_note(skipped: list[str]) -> str:
    """One line naming the symlinks :func:`walk_images` did not follow."""
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (
        f"symlink(s) to a folder above them or already read were not followed (each folder is read once): "
        f"{', '.join(skipped[:3])}{more}"
    )


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by extension) anywhere under ``folder``, symlinks followed, each real folder once, sorted; a
    ``DataWarning`` names the symlinks not followed (loops, second paths: :func:`walk_images`)."""
    images, skipped = walk_images(folder)
    if skipped:
        from asg.data.bundle import DataWarning

        warnings.warn(DataWarning(links_note(skipped)), stacklevel=2)
    return images


class FileImageDataset(Dataset):
    """Base of datasets whose items are image files. Subclasses set ``labels``, ``transform`` and ``image_path``;
    ``image(i)`` reads the image alone (unlabelled target sets use it).

    Items are ``(FloatTensor [3, S, S] in [0, 1], int)``; ``None`` for an undecodable image when
    ``on_bad_image == "skip"`` (the line ``PATH: reason`` is appended to ``skip_log``, or warned when unset).
    The log file is opened in append mode per write, so DataLoader worker processes can share it.
    """

    labels: np.ndarray
    transform: Transform
    on_bad_image: str = "error"
    skip_log: Path | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def image_path(self, i: int) -> Path:
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Where item ``i`` is listed (``FILE:LINE``), or "" when it is not listed anywhere."""
        return ""

    def log_skipped(self, line: str) -> None:
        """Record one skipped image (``PATH: reason``) in ``skip_log``."""
        if self.skip_log is None:
            warnings.warn(f"skipped bad image {line}", stacklevel=2)
            return
        with open(self.skip_log, "a+", encoding="utf-8") as f:
            f.seek(0)
            if line + "\n" not in f.read():  # every evaluation meets the same bad file: list it once
                f.write(line + "\n")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        image = self.image(i)
        return None if image is None else (image, int(self.labels[i]))

    def image(self, i: int) -> torch.Tensor | None:
        """Image i alone (its label is not read); None when it is unreadable and ``on_bad_image == "skip"``."""
        try:
            img = open_image(self.image_path(i), where=self.where(i))
        except ImageReadError as exc:
            if self.on_bad_image != "skip":
                raise
            self.log_skipped(f"{exc.path}: {exc.reason}")
            return None
        return self.transform(img)
