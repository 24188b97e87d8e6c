"""Teacher logits on disk: computed once per (dataset, transform, teacher, storage), memory-mapped, shared by runs.

A cache is the folder ``<root>/<key>/`` (``key`` from :func:`cache_key`; ``root`` defaults to
``$XDG_CACHE_HOME/asg/teacher``) holding ``meta.json`` (key, n, storage, k, created, description, complete, the
measured storage error), the data ``.npy`` files and ``filled.npy`` (bool [N]). Storage modes, for N images and
C classes:

- ``fp32``: ``logits`` float32 [N, C], exact.
- ``fp16``: ``logits`` float16 [N, C].
- ``topk``: ``topk_logp`` float16 [N, k], the log-probabilities of the k largest logits, ``topk_idx`` int16
  [N, k] their classes, ``lse`` float32 [N] the log-sum-exp of all C logits and ``rest`` float32 [N] the log of
  the probability mass outside the top k. Reconstruction (log-probs, as good as logits under softmax): the k
  stored log-probs; the rest mass spread uniformly over the other C - k classes.

A folder is built under a temporary name and renamed into place when complete, so a crash never leaves a cache
that looks usable; :meth:`TeacherLogitCache.open` refuses a folder that is incomplete, corrupt (each file's
SHA-256 is in meta.json, verified once per process and again when a file changes) or built for something else,
and :meth:`TeacherLogitCache.build_or_open` rebuilds it. Space is checked and reserved (``posix_fallocate``)
before the memory-mapped files are written, so a full disk is an error message, not a SIGBUS.

This module holds :class:`TeacherLogitCache` (open with its checks, build or open). Its parts: the key
(:mod:`asg.engine.teacher.keys`: it covers the images, the caller's transform description, the teacher's weights
and the storage), the storage modes (:mod:`asg.engine.teacher.storage`), the folder's files
(:mod:`asg.engine.teacher.files`) and the build (:mod:`asg.engine.teacher.build`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from asg.engine.teacher.build import _fill, _write_failure
from asg.engine.teacher.files import _install, _remove_dead_builds, _tmp_prefix, _verify
from asg.engine.teacher.storage import FORMAT_VERSION, TeacherCacheError, _decode, _layout, check_storage


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/asg/teacher``, or ``~/.cache/asg/teacher``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asg" / "teacher"


class TeacherLogitCache:
    """A complete cache folder, memory-mapped read-only (``arrays``: name -> np.memmap)."""

    def __init__(self, path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.path, self.meta, self.arrays = path, meta, arrays
        self.built = False  # True when build_or_open computed it (False: an existing folder was opened)
        self.replaced: str | None = None  # why build_or_open rebuilt a folder it found under the key

    @property
    def n(self) -> int:
        return int(self.meta["n"])

    @property
    def storage(self) -> str:
        return str(self.meta["storage"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def __len__(self) -> int:
        return self.n

    def logits(self, idx: Tensor) -> Tensor:
        """Dataset indices LongTensor [B] -> teacher logits [B, C] float32 on the CPU (topk: log-probs)."""
        rows = idx.detach().cpu().numpy().astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise IndexError(f"teacher cache {self.path} has {self.n} images; asked for index {rows.max()}")
        return _decode({name: arr[rows] for name, arr in self.arrays.items()}, self.storage, self.num_classes)

    @classmethod
    def open(
        cls,
        root: str | Path | None,
        key: str,
        *,
        n: int | None = None,
        storage: str | None = None,
        k: int | None = None,
    ) -> TeacherLogitCache:
        """Open the complete folder ``<root>/<key>``; TeacherCacheError if it is missing, incomplete, corrupt,
        truncated, or its meta.json disagrees with ``key`` or the given ``n``, ``storage``, ``k``."""
        path = Path(root if root is not None else default_cache_root()) / key
        fix = "delete the folder (the next run rebuilds it)"
        try:
            meta = json.loads((path / "meta.json").read_text())
            wanted = {"format": FORMAT_VERSION, "key": key, "complete": True}
            wanted.update({name: v for name, v in (("n", n), ("storage", storage)) if v is not None})
            if storage is not None and k is not None:
                wanted["k"] = check_storage(storage, k)
            wrong = {name: meta.get(name) for name, v in wanted.items() if meta.get(name) != v}
            if wrong:
                raise TeacherCacheError(f"teacher cache {path} was built for {wrong}, not {wanted}; {fix}")
            n_, layout = int(meta["n"]), _layout(meta["storage"], int(meta["n"]), meta["num_classes"], meta["k"])
            arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in layout}
            filled = np.load(path / "filled.npy", mmap_mode="r")
        except TeacherCacheError:
            raise
        except FileNotFoundError as exc:
            raise TeacherCacheError(f"teacher cache {path} is missing {Path(exc.filename).name}; {fix}") from None
        except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise TeacherCacheError(f"teacher cache {path} is unreadable ({why}); {fix}") from None
        for name, (dtype, shape) in (*layout.items(), ("filled", (np.dtype(np.bool_), (n_,)))):
            arr = filled if name == "filled" else arrays[name]
            if arr.dtype != dtype or arr.shape != shape:
                got = f"{arr.dtype} {arr.shape}"
                raise TeacherCacheError(f"teacher cache {path}: {name}.npy is {got}, expected {dtype} {shape}; {fix}")
        if not filled.all():
            raise TeacherCacheError(f"teacher cache {path} is incomplete ({int(filled.sum())}/{n_} filled); {fix}")
        _verify(path, meta, ["filled", *layout], fix)
        return cls(path, meta, arrays)

    @classmethod
    def build_or_open(
        cls,
        root: str | Path | None,
        key: str,
        dataset: Dataset,
        teacher: nn.Module,
        *,
        storage: str = "fp32",
        k: int = 32,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        description: str = "",
        show_progress: bool = False,
    ) -> TeacherLogitCache:
        """Open ``<root>/<key>``, or compute ``teacher``'s logits of every item of ``dataset`` (index order,
        eval mode, no grad; items ``(image [3, H, W], target)``) into it. A folder that ``open`` refuses is
        rebuilt (``replaced`` says why); a crash leaves no folder under ``key``."""
        root = Path(root if root is not None else default_cache_root())
        k = check_storage(storage, k)
        n = len(cast(Sized, dataset))
        replaced = None
        if (root / key).exists():
            try:
                return cls.open(root, key, n=n, storage=storage, k=k)
            except TeacherCacheError as exc:
                replaced = str(exc)
        tmp: Path | None = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_dead_builds(root, key)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=_tmp_prefix(key)))
            _fill(tmp, key, dataset, teacher, storage, k, batch_size, device, description, show_progress)
            _install(tmp, root / key, replace=replaced is not None)
        except OSError as exc:
            raise TeacherCacheError(_write_failure(root, exc)) from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        cache = cls.open(root, key, n=n, storage=storage, k=k)
        cache.built, cache.replaced = True, replaced
        return cache
