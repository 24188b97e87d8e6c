"""The file side of a teacher-logit cache folder: temporary build names (and removing those of dead builds),
free-space checks and block reservation, fsync, SHA-256 checksums verified once per process and file version,
and the atomic rename that installs a built folder under its key."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from asg.engine.teacher.storage import TeacherCacheError
from asg.io import sha256_file

SPACE_MARGIN = 16 << 20  # bytes kept free beyond the cache's own size


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
        raise OSError(
            errno.ENOSPC,
            f"not enough free space (it needs {(needed + SPACE_MARGIN) / 2**20:,.1f} MiB "
            f"with a margin of {SPACE_MARGIN >> 20} MiB, {free / 2**20:,.1f} MiB are free)",
        )


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
        if sha256_file(file) != sums.get(name):
            raise TeacherCacheError(
                f"teacher cache {path}: {name}.npy does not match its checksum (corrupted on "
                f"disk or changed by hand); {fix}"
            )
        _VERIFIED.add(seen)
