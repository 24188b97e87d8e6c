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

The key covers the images (``key_mode`` "stat": each file's path, size and modification time; "content": each
file's bytes; in-memory arrays: always their bytes), the caller's transform description, the teacher's weights
and the storage. It does not cover what the transform description leaves out.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from asg.errors import AsgError
from asg.utils import progress

STORAGES = ("fp32", "fp16", "topk")
KEY_MODES = ("auto", "stat", "content")
CONTENT_KEY_MAX_BYTES = 2 << 30  # "auto" hashes the bytes of image files up to this total size, else stats them
SPACE_MARGIN = 16 << 20  # bytes kept free beyond the cache's own size
FORMAT_VERSION = 1
LOGP_FLOOR = -1.0e4  # log-prob of classes whose share underflows: finite, so 0 * (logp - floor) stays 0


class TeacherCacheError(AsgError):
    """A teacher-logit cache that is missing, incomplete, corrupt or built for something else."""


class UnfingerprintableDataset(TeacherCacheError):
    """A dataset whose images cannot be hashed (use the in-memory teacher cache for it)."""


def default_cache_root() -> Path:
    """``$XDG_CACHE_HOME/asg/teacher``, or ``~/.cache/asg/teacher``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asg" / "teacher"


def check_storage(storage: str, k: int) -> int:
    """The k that counts for ``storage`` (0 unless "topk"); TeacherCacheError for an unknown mode or a bad k."""
    if storage not in STORAGES:
        raise TeacherCacheError(f"teacher cache storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if storage != "topk":
        return 0
    if not 1 <= int(k) <= 32768:
        raise TeacherCacheError(f"teacher cache top-k must be in [1, 32768], got {k}")
    return int(k)


# --------------------------------------------------------------------------- keys


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


# --------------------------------------------------------------------------- storage codecs


def _layout(storage: str, n: int, c: int, k: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of each data file."""
    if storage != "topk":
        return {"logits": (np.dtype(np.float32 if storage == "fp32" else np.float16), (n, c))}
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    return {
        "topk_logp": (f16, (n, k)),
        "topk_idx": (np.dtype(np.int16), (n, k)),
        "lse": (f32, (n,)),
        "rest": (f32, (n,)),
    }


def _encode(logits: Tensor, storage: str, k: int) -> dict[str, np.ndarray]:
    """Logits [B, C] -> the rows of each data file."""
    z = logits.detach().float().cpu()
    if storage == "fp32":
        return {"logits": z.numpy()}
    if storage == "fp16":
        half = z.half()
        if not bool(torch.isfinite(half).all()):
            raise TeacherCacheError("teacher logits exceed the float16 range (|z| > 65504): use storage fp32 or topk")
        return {"logits": half.numpy()}
    logp = torch.log_softmax(z.double(), dim=1)
    top, idx = logp.topk(k, dim=1)
    rest = logp.scatter(1, idx, -math.inf).logsumexp(dim=1)  # -inf when k == C
    return {
        "topk_logp": top.clamp(min=LOGP_FLOOR).half().numpy(),
        "topk_idx": idx.short().numpy(),
        "lse": z.double().logsumexp(dim=1).float().numpy(),
        "rest": rest.float().numpy(),
    }


def _decode(rows: dict[str, np.ndarray], storage: str, num_classes: int) -> Tensor:
    """Rows of each data file -> logits [B, C] float32 (topk: reconstructed log-probs)."""
    if storage != "topk":
        return torch.from_numpy(np.asarray(rows["logits"], dtype=np.float32))
    top = torch.from_numpy(np.asarray(rows["topk_logp"], dtype=np.float32))
    idx = torch.from_numpy(np.asarray(rows["topk_idx"], dtype=np.int64))
    out = torch.full((len(top), num_classes), LOGP_FLOOR)
    if top.shape[1] < num_classes:
        rest = torch.from_numpy(np.asarray(rows["rest"], dtype=np.float32))
        out[:] = (rest - math.log(num_classes - top.shape[1])).clamp(min=LOGP_FLOOR)[:, None]
    return out.scatter_(1, idx, top)


def kl_rows(exact: Tensor, stored: Tensor) -> Tensor:
    """KL(softmax(exact) || softmax(stored)) per row, both [B, C] -> [B] float64 (nats)."""
    lp, lq = torch.log_softmax(exact.double(), dim=1), torch.log_softmax(stored.double(), dim=1)
    return (lp.exp() * (lp - lq)).sum(dim=1)


def measure_storage_error(exact_logits: Tensor, storage: str, k: int = 32) -> dict[str, float]:
    """``{"kl_max", "kl_mean"}`` of KL(p_exact || p_stored) over the rows of ``exact_logits`` [N, C]."""
    k = check_storage(storage, k)
    kl = kl_rows(exact_logits, _decode(_encode(exact_logits, storage, k), storage, exact_logits.shape[1]))
    return {"kl_max": float(kl.max()), "kl_mean": float(kl.mean())}


# --------------------------------------------------------------------------- folders


def _tmp_prefix(key: str) -> str:
    return f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_builds(root: Path, key: str) -> None:
    """Delete this key's temporary folders left by builds on this host whose process has died."""
    for path in root.glob(f".{key}.tmp-*"):
        parts = path.name[len(f".{key}.tmp-") :].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == socket.gethostname() and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _reserve(path: Path) -> None:
    """Allocate a (sparse) file's blocks now: writing a memory map over a full disk would kill with SIGBUS."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise OSError(errno.ENOSPC, f"not enough free space (it needs {(needed + SPACE_MARGIN) / 2**20:,.1f} MiB "
                      f"with a margin of {SPACE_MARGIN >> 20} MiB, {free / 2**20:,.1f} MiB are free)")  # fmt: skip


def _images(batch: list[Any], start: int) -> Tensor:
    """Stack the image tensors [3, H, W] of a list of ``(image, target)`` items -> [B, 3, H, W]."""
    for j, item in enumerate(batch):
        if item is None:
            raise TeacherCacheError(
                f"training image {start + j} could not be read (the dataset returned None); the teacher cache "
                "needs every image: fix or leave out the file, or use the in-memory teacher cache"
            )
    return torch.stack([item[0] for item in batch])


def _fill(folder: Path, key: str, dataset: Dataset, teacher: nn.Module, storage: str, k: int, batch_size: int,
          device: str | torch.device, description: str, show_progress: bool) -> None:  # fmt: skip
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
    checksums = {name: _file_sha256(folder / f"{name}.npy") for name in ("filled", *arrays)}
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


def _install(tmp: Path, dest: Path, replace: bool) -> None:
    """Rename the built folder ``tmp`` to ``dest`` (moving a refused ``dest`` aside first when ``replace``)."""
    if replace:
        aside = dest.parent / f".{dest.name}.old-{os.getpid()}-{time.time_ns()}"
        try:
            os.rename(dest, aside)
        except FileNotFoundError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, dest)
    except OSError:
        if not dest.is_dir():
            raise  # else another process installed this key first: its folder is used
    _fsync(dest.parent)


_VERIFIED: set[tuple[str, str, int, int, int]] = set()  # (file, sha256, inode, size, ctime) verified here


def _verify(path: Path, meta: dict[str, Any], names: list[str], fix: str) -> None:
    """Check each data file against its SHA-256 in meta.json (once per process and file version)."""
    sums = meta.get("sha256")
    if not isinstance(sums, dict):
        raise TeacherCacheError(f"teacher cache {path} has no checksums (built by an older asg); {fix}")
    for name in names:
        file = path / f"{name}.npy"
        st = file.stat()
        seen = (str(file), str(sums.get(name)), st.st_ino, st.st_size, st.st_ctime_ns)  # ctime: utime cannot reset it
        if seen in _VERIFIED:
            continue
        if _file_sha256(file) != sums.get(name):
            raise TeacherCacheError(f"teacher cache {path}: {name}.npy does not match its checksum (corrupted on "
                                    f"disk or changed by hand); {fix}")  # fmt: skip
        _VERIFIED.add(seen)


# --------------------------------------------------------------------------- the cache


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
    def open(cls, root: str | Path | None, key: str, *, n: int | None = None, storage: str | None = None,
             k: int | None = None) -> TeacherLogitCache:  # fmt: skip
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
    def build_or_open(cls, root: str | Path | None, key: str, dataset: Dataset, teacher: nn.Module, *,
                      storage: str = "fp32", k: int = 32, batch_size: int = 64, device: str | torch.device = "cpu",
                      description: str = "", show_progress: bool = False) -> TeacherLogitCache:  # fmt: skip
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


def _write_failure(root: Path, exc: OSError) -> str:
    """One line for an OSError while building a cache under ``root``, naming the setting to change."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(root) else ""
    what = f"cannot write the teacher cache in {root}{where}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"{what}; free space, or set method.teacher_cache_dir to a folder on another disk (or "
                "method.teacher_cache_storage=fp16/topk/memory)")  # fmt: skip
    return f"{what}; set method.teacher_cache_dir to a folder you can write"
