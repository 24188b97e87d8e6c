"""Building a teacher-logit cache folder: the teacher's logits of every image, computed in index order into the
memory-mapped data files of a storage mode (space checked and reserved first), then ``filled.npy`` and
``meta.json`` with the checksums and the measured storage error, all fsynced; and the one-line message for a
build that cannot write."""

from __future__ import annotations

import errno
import json
import math
import time
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from asg.engine.teacher.files import _check_space, _fsync, _reserve
from asg.engine.teacher.storage import FORMAT_VERSION, TeacherCacheError, _decode, _encode, _layout, kl_rows
from asg.io import sha256_file
from asg.utils import progress


def _images(batch: list[Any], start: int) -> Tensor:
    """Stack the image tensors [3, H, W] of a list of ``(image, target)`` items -> [B, 3, H, W]."""
    for j, item in enumerate(batch):
        if item is None:
            raise TeacherCacheError(
                f"training image {start + j} could not be read (the dataset returned None); the teacher cache "
                "needs every image: fix or leave out the file, or use the in-memory teacher cache"
            )
    return torch.stack([item[0] for item in batch])


def _fill(
    folder: Path,
    key: str,
    dataset: Dataset,
    teacher: nn.Module,
    storage: str,
    k: int,
    batch_size: int,
    device: str | torch.device,
    description: str,
    show_progress: bool,
) -> None:
    """Compute every logit into ``folder`` (data files, filled.npy, then meta.json), all fsynced."""
    n = len(cast(Sized, dataset))
    if n == 0:
        raise TeacherCacheError("cannot cache the teacher's logits of an empty dataset")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=list)
    _check_space(folder, n)
    filled = np.lib.format.open_memmap(folder / "filled.npy", mode="w+", dtype=np.bool_, shape=(n,))
    _reserve(folder / "filled.npy")
    arrays: dict[str, np.memmap] = {}
    start, c, kl_sum, kl_max = 0, 0, 0.0, 0.0
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            for batch in progress(loader, desc="teacher logits", enabled=show_progress):
                z = teacher(_images(batch, start).to(device)).float().cpu()
                if z.ndim != 2 or len(z) != len(batch) or not bool(torch.isfinite(z).all()):
                    raise TeacherCacheError(f"the teacher gave non-finite or [B, C]-less logits {tuple(z.shape)}")
                if not arrays:
                    c = z.shape[1]
                    if k > c or c > 32768:
                        raise TeacherCacheError(f"top-k {k} needs 1 <= k <= C <= 32768 classes, C = {c}")
                    layout = _layout(storage, n, c, k)
                    _check_space(folder, sum(dt.itemsize * math.prod(shape) for dt, shape in layout.values()))
                    arrays = {
                        name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dt, shape=shape)
                        for name, (dt, shape) in layout.items()
                    }
                    for name in arrays:
                        _reserve(folder / f"{name}.npy")
                encoded = _encode(z, storage, k)
                for name, rows in encoded.items():
                    arrays[name][start : start + len(z)] = rows
                filled[start : start + len(z)] = True
                kl = kl_rows(z, _decode(encoded, storage, c))
                kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
                start += len(z)
    finally:
        teacher.train(was_training)
    if start != n or not filled.all():
        raise TeacherCacheError(f"the dataset yielded {start} of its {n} images")
    for arr in (filled, *arrays.values()):
        arr.flush()
    checksums = {name: sha256_file(folder / f"{name}.npy") for name in ("filled", *arrays)}
    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "n": n,
        "num_classes": c,
        "storage": storage,
        "k": k,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "description": description,
        "complete": True,
        "storage_error": {"kl_max": kl_max, "kl_mean": kl_sum / n, "what": "KL(p_exact || p_stored) per image, nats"},
        "sha256": checksums,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    for path in folder.iterdir():
        _fsync(path)


def _write_failure(root: Path, exc: OSError) -> str:
    """One line for an OSError while building a cache under ``root``, naming the setting to change."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(root) else ""
    what = f"cannot write the teacher cache in {root}{where}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (
            f"{what}; free space, or set teacher.cache_dir to a folder on another disk (or "
            "teacher.cache_storage=fp16/topk/memory)"
        )
    return f"{what}; set teacher.cache_dir to a folder you can write"
