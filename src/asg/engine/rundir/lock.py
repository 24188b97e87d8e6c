"""The run folder's lock and its write guard: one process writes a folder, and a failed write says why.

- **lock**: an exclusive ``fcntl`` lock on ``.lock`` for the run's life (the OS drops it when the process dies);
  a second process gets an error naming the holder's PID.
- **guard**: an ``OSError`` (or a library's write failure) while writing becomes one :class:`RunFolderError`
  line saying what to do (disk full, file size limit, permissions).

:class:`asg.engine.rundir.folder.RunDir` builds on :class:`LockedFolder`.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from safetensors import SafetensorError

from asg.errors import AsgError
from asg.io import atomic_write_text

try:
    import fcntl
    import resource
except ImportError:  # Windows: no advisory lock (documented)
    fcntl = None  # type: ignore[assignment]
    resource = None  # type: ignore[assignment]

_HELD_LOCKS: dict[int, int] = {}  # lock fd -> pid of the process that took it
_F = TypeVar("_F", bound="LockedFolder")


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock fds, so that the lock dies with the
    process that took it instead of living on in its orphaned children."""
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _holder_note(holder: str) -> str:
    """A hint when the PID named in the lock file is gone (its children may hold the lock for a moment)."""
    parts = holder.split()
    if len(parts) < 2 or parts[0] != "pid" or not parts[1].isdigit():
        return ""
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return "; that process has exited: a child of it may hold the lock for a few seconds, retry"
    except PermissionError:
        pass
    return ""


class RunFolderError(AsgError):
    """The run folder is locked, unwritable, full, or holds an inconsistent checkpoint."""


def _hint(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full: free space or choose another --out"
    if exc.errno == errno.EFBIG:
        return "a file size limit was hit (ulimit -f): raise it or choose another --out"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable: fix its permissions or choose another --out"
    return "check the folder or choose another --out"


def _write_failure_hint(path: Path) -> str:
    """Why a write under ``path`` may have failed when the library does not say (safetensors, torch.save)."""
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else path.parent.parent).free
    except OSError:
        free = None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else -1
    if limit not in (-1, getattr(resource, "RLIM_INFINITY", -1)):
        return f"the file size limit (ulimit -f) is {limit:,} bytes: raise it, then resume with --resume"
    if free is not None and free < 256 << 20:
        return f"the disk is full ({free / 2**20:,.1f} MiB free): free space, then resume with --resume"
    return "the disk may be full or failing: check it, then resume with --resume"


def _is_write_failure(exc: Exception) -> bool:
    """A SafetensorError, or torch.save's RuntimeError for a failed write (it hides the OSError)."""
    text = str(exc)
    return isinstance(exc, SafetensorError) or any(t in text for t in ("write", "unexpected pos", "inline_container"))


class LockedFolder:
    """A folder one process writes at a time. Use as a context manager (or ``lock()``/``unlock()``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the folder's exclusive lock (creating the folder); RunFolderError names the holder's PID."""
        self._guard(lambda: self.path.mkdir(parents=True, exist_ok=True), self.path, "create")
        if fcntl is None or self._lock_fd is not None:
            return
        lock_path = self.path / ".lock"
        fd = self._guard(lambda: os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644), lock_path, "create")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(
                f"run folder {self.path} is in use by another asg process ({holder}); wait for it to finish, "
                f"stop it, or choose another --out{_holder_note(holder)}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%H:%M:%S')}".encode(), 0)
        self._lock_fd = fd
        _HELD_LOCKS[fd] = os.getpid()
        self._after_lock()

    def _after_lock(self) -> None:
        """Tidy what only the lock holder writes (a subclass removes the temporary files of killed writes)."""

    def holder(self) -> str | None:
        """Who holds this folder's lock ("pid N on HOST since T"), or None when no process does."""
        lock_path = self.path / ".lock"
        if fcntl is None or self._lock_fd is not None or not lock_path.is_file():
            return None
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)  # drops the shared lock taken to test it
        return None

    def unlock(self) -> None:
        """Drop the lock (a no-op when this object does not hold it)."""
        if self._lock_fd is not None:
            if _HELD_LOCKS.get(self._lock_fd) == os.getpid():  # (in a forked child the fd is closed already)
                del _HELD_LOCKS[self._lock_fd]
                os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def __enter__(self: _F) -> _F:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    def _guard(self, fn: Callable[[], Any], path: Path, what: str = "write", extra: str = "") -> Any:
        """``fn()``, with a failed write turned into one RunFolderError line naming ``path`` and the remedy."""
        try:
            return fn()
        except OSError as exc:
            raise RunFolderError(f"cannot {what} {path}: {exc.strerror or exc}; {_hint(exc)}{extra}") from None
        except (SafetensorError, RuntimeError) as exc:
            if what != "write" or not _is_write_failure(exc):
                raise
            detail = " ".join(str(exc).split())[:160]
            raise RunFolderError(f"cannot write {path} ({detail}); {_write_failure_hint(path)}{extra}") from None

    def write_text(self, name: str, text: str) -> Path:
        """Write ``name`` atomically (temporary file, then rename)."""
        path = self.path / name
        self._guard(lambda: atomic_write_text(path, text), path)
        return path

    def exists(self, name: str) -> bool:
        """True when ``name`` exists in the folder."""
        return (self.path / name).exists()
