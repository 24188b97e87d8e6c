"""The key of a teacher-logit cache: fingerprints of the dataset's images and of the teacher's weights.

The key covers the images (``key_mode`` "stat": each file's path, size and modification time; "content": each
file's bytes; in-memory arrays: always their bytes; "auto": content up to :data:`CONTENT_KEY_MAX_BYTES` of image
files, else stat), the caller's transform description, the teacher's weights and the storage. It does not cover
what the transform description leaves out.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from asg.engine.teacher.storage import FORMAT_VERSION, TeacherCacheError, check_storage

KEY_MODES = ("auto", "stat", "content")
CONTENT_KEY_MAX_BYTES = 2 << 30  # "auto" hashes the bytes of image files up to this total size, else stats them


class UnfingerprintableDataset(TeacherCacheError):
    """A dataset whose images cannot be hashed (use the in-memory teacher cache for it)."""


def _tensor_bytes(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _file_bytes(path: str, h: Any) -> None:
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError as exc:
        raise UnfingerprintableDataset(f"cannot fingerprint image {path}: {exc.strerror}") from None


def _feed_dataset(h: Any, ds: Any, content: bool) -> None:
    name = type(ds).__qualname__
    if hasattr(ds, "dataset") and hasattr(ds, "indices"):  # LabeledSubset, torch's Subset
        idx = np.ascontiguousarray(ds.indices, dtype=np.int64)
        h.update(f"subset {name} {len(idx)}\n".encode())
        h.update(idx.data)
        _feed_dataset(h, ds.dataset, content)
    elif callable(getattr(ds, "image_path", None)):  # file-backed: paths, sizes and mtimes, or contents
        transform = repr(getattr(ds, "transform", None))
        transform = type(getattr(ds, "transform", None)).__qualname__ if " at 0x" in transform else transform
        h.update(f"files {name} {len(ds)} {transform}\n".encode())
        for i in range(len(ds)):
            path = os.path.abspath(ds.image_path(i))
            try:
                st = os.stat(path)
            except OSError as exc:
                raise UnfingerprintableDataset(f"cannot fingerprint image {path}: {exc.strerror}") from None
            if content:
                h.update(f"{path}\0{st.st_size}\0".encode())
                _file_bytes(path, h)
                h.update(b"\n")
            else:
                h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    elif isinstance(getattr(ds, "images", None), (np.ndarray, Tensor)):  # in-memory arrays
        arr = ds.images
        data = _tensor_bytes(arr) if isinstance(arr, Tensor) else np.ascontiguousarray(arr)
        size = getattr(ds, "image_size", None)
        h.update(f"array {name} {arr.dtype} {tuple(arr.shape)} image_size={size}\n".encode())
        h.update(data.data)
    else:
        raise UnfingerprintableDataset(
            f"cannot fingerprint a {type(ds).__name__} for the teacher cache: it has no image_path(i), no images "
            "array and is not a subset (.dataset, .indices) of such a dataset"
        )


def _files_total(ds: Any) -> int | None:
    """Total bytes of a file-backed dataset's images (through subsets); None for in-memory data."""
    if hasattr(ds, "dataset") and hasattr(ds, "indices"):
        return _files_total(ds.dataset)
    if not callable(getattr(ds, "image_path", None)):
        return None
    total = 0
    for i in range(len(ds)):
        try:
            total += os.stat(ds.image_path(i)).st_size
        except OSError:
            pass  # reported by the fingerprint
    return total


def resolve_key_mode(dataset: Dataset, key_mode: str = "auto") -> str:
    """ "stat" or "content": ``key_mode``, or for "auto" content up to CONTENT_KEY_MAX_BYTES of image files
    (in-memory arrays are always hashed by content)."""
    if key_mode not in KEY_MODES:
        raise TeacherCacheError(f"teacher cache key must be one of {', '.join(KEY_MODES)}, got {key_mode!r}")
    if key_mode != "auto":
        return key_mode
    total = _files_total(dataset)
    return "content" if total is None or total <= CONTENT_KEY_MAX_BYTES else "stat"


def dataset_fingerprint(dataset: Dataset, key_mode: str = "stat") -> str:
    """sha256 hex of a dataset's images: file paths + sizes + mtimes ("stat") or + bytes ("content"), array
    bytes + image_size, or a subset's indices + its parent's fingerprint. UnfingerprintableDataset for any other
    dataset."""
    h = hashlib.sha256()
    _feed_dataset(h, dataset, resolve_key_mode(dataset, key_mode) == "content")
    return h.hexdigest()


def teacher_fingerprint(teacher: nn.Module) -> str:
    """sha256 hex of the teacher's class and state-dict tensors (names, dtypes, shapes, bytes), in key order."""
    h = hashlib.sha256(type(teacher).__qualname__.encode())
    for name, t in teacher.state_dict().items():
        h.update(f"\n{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t).data)
    return h.hexdigest()


def cache_key(
    dataset: Dataset, transform: str, teacher: nn.Module, storage: str, k: int = 32, key_mode: str = "stat"
) -> str:
    """sha256 hex naming the cache of ``teacher``'s logits on ``dataset`` seen through ``transform`` (a caller's
    description of the deterministic training transform) in ``storage`` (k counts for "topk" only); image files
    enter by path, size and mtime (``key_mode`` "stat") or by their bytes ("content"; "auto": see
    :func:`resolve_key_mode`)."""
    mode = resolve_key_mode(dataset, key_mode)
    parts = {
        "format": FORMAT_VERSION,
        "dataset": dataset_fingerprint(dataset, mode),
        "transform": transform,
        "teacher": teacher_fingerprint(teacher),
        "storage": storage,
        "k": check_storage(storage, k),
    }
    if mode == "content" and _files_total(dataset) is not None:  # (stat keys and array keys as before)
        parts["dataset_key"] = "content"
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
