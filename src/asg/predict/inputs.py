"""What ``asg predict`` reads: image files, folders (recursive, sorted), list files and ``-`` (a list on standard
input), and each image decoded as the datasets decode theirs (EXIF orientation, 16-bit gray, palette, RGBA).

An image that cannot be read is never fatal here: :func:`load_image` raises an ``ImageReadError`` naming the file,
which the caller records and counts.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image

from asg.data.images import IMG_EXTENSIONS, ImageReadError, list_images, read_image
from asg.errors import AsgError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS)


@dataclass(frozen=True)
class InputItem:
    """One image to predict: its ``path`` and the ``key`` its outputs are named by (relative, no suffix)."""

    path: Path
    key: str


def _list_file(lines: Iterable[str], base: Path, where: str) -> list[Path]:
    """Paths of a list file's lines (blank and ``#`` lines skipped; a trailing integer label ignored), relative
    ones taken from ``base``."""
    out = []
    for line in lines:
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit() and not (base / text).exists():
            text = parts[0]  # "path label" lines of a training list
        path = Path(text).expanduser()
        out.append(path if path.is_absolute() else base / path)
    if not out:
        raise AsgError(f"the list {where} names no image")
    return out


def collect_inputs(specs: list[str], stdin: IO[str] | None = None) -> list[InputItem]:
    """The images named by ``specs`` (files, folders, list files, ``-``), in order, each with a unique key.

    AsgError when a spec does not exist, a folder holds no image, or nothing is left to predict.
    """
    pairs: list[tuple[Path, str]] = []  # (path, key before de-duplication)
    for spec in specs:
        if spec == "-":
            stream = stdin if stdin is not None else sys.stdin
            pairs += [(p, p.with_suffix("").name) for p in _list_file(stream, Path.cwd(), "on standard input")]
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise AsgError(f"the folder {path} holds no image ({', '.join(IMG_EXTENSIONS)})")
            pairs += [(p, p.relative_to(path).with_suffix("").as_posix()) for p in found]
        elif path.is_file() and path.suffix.lower() in IMG_EXTENSIONS:
            pairs.append((path, path.with_suffix("").name))
        elif path.is_file():  # a list file
            with open(path, encoding="utf-8", errors="replace") as f:
                listed = _list_file(f, path.parent, str(path))
            pairs += [(p, p.with_suffix("").name) for p in listed]
        else:
            raise AsgError(
                f"input {spec} does not exist (give image files, folders, list files or - for a list on standard input)"
            )
    if not pairs:
        raise AsgError("no image to predict")
    seen: dict[str, int] = {}
    items = []
    for path, key in pairs:
        n = seen.get(key, 0)
        seen[key] = n + 1
        items.append(InputItem(path, key if n == 0 else f"{key}_{n + 1}"))
    return items


def load_image(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` as "L" or "RGB" (:func:`asg.data.images.read_image`); ``ImageReadError`` when it is missing,
    unreadable, truncated or larger than ``max_pixels`` (None: no limit)."""
    try:
        with Image.open(path) as probe:  # reads the header only
            w, h = probe.size
    except FileNotFoundError:
        raise ImageReadError(f"image file {path} does not exist", path, "does not exist") from None
    except Exception as exc:  # PIL raises many types for files that are not images
        raise ImageReadError(f"cannot read image {path}: {exc}", path, f"cannot decode: {exc}") from None
    if max_pixels is not None and w * h > max_pixels:
        why = f"{w} x {h} = {w * h} pixels exceeds the limit of {max_pixels} (--max-pixels)"
        raise ImageReadError(f"image {path} refused: {why}", path, f"refused: {why}")
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # checked above against our own limit
    try:
        return read_image(path)
    except Exception as exc:
        raise ImageReadError(
            f"cannot read image {path}: {type(exc).__name__}: {exc}",
            path,
            f"cannot decode: {type(exc).__name__}: {exc}",
        ) from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def to_pil(image: Any) -> Image.Image:
    """A PIL image, a numpy array ([H, W], [H, W, 3|4]; uint8, or float in [0, 1]) or a tensor ([3, H, W] or
    [H, W]; float in [0, 1] or uint8) as an "L" or "RGB" PIL image (arrays and tensors are read as 8-bit)."""
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            from asg.data.images import wide_gray_to_l

            return wide_gray_to_l(image)
        return image.convert("L") if image.mode in ("1", "L") else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating):
                arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0)
            elif arr.dtype == np.uint16:
                arr = np.rint(arr.astype(np.float64) * (255.0 / 65535.0))
            arr = arr.astype(np.uint8)
        if arr.ndim == 2:
            return Image.fromarray(arr, "L")
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), "RGB")
        raise AsgError(f"an image array of shape {list(image.shape)}: expected [H, W], [H, W, 3] or [3, H, W]")
    if isinstance(image, (str, Path)):
        return load_image(Path(image))
    raise AsgError(f"cannot predict a {type(image).__name__}: give PIL images, numpy arrays, tensors or paths")
