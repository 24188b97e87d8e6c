"""The run folder: one object that locks it, writes its files and keeps its checkpoints consistent.

Training, meta-training and the demo all write through :class:`RunDir`:

- **lock**: an exclusive ``fcntl`` lock on ``.lock`` for the run's life (the OS drops it when the process dies);
  a second process gets an error naming the holder's PID.
- **history**: ``results.jsonl`` rows are appended and flushed; on resume the file is cut back to the rows the
  restored checkpoint has seen, so every step appears once.
- **checkpoints**: each checkpoint is a set of immutable, step-named files under ``checkpoints/`` (weights in
  safetensors, trainer state in a weights-only torch file, the best-so-far weights per selection rule) tied
  together by the manifest ``checkpoint.json``, written last and atomically with every file's step and SHA-256.
  Files no manifest names are deleted only after the manifest that replaces them is on disk, so a crash at any
  moment leaves the previous checkpoint whole. ``last.safetensors`` and ``best_*.safetensors`` in the folder are
  hard links (or copies) of the manifest's files, for users and ``asg evaluate``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from asg.engine.checkpoint import atomic_write, load_state, save_state, save_weights
from asg.errors import AsgError

try:
    import fcntl
    import resource
except ImportError:  # Windows: no advisory lock (documented)
    fcntl = None  # type: ignore[assignment]
    resource = None  # type: ignore[assignment]

MANIFEST = "checkpoint.json"
FORMAT = 1
EXPORTS = {"last": "last.safetensors", "source-val": "best_source_val.safetensors", "oracle": "best_oracle.safetensors"}
# files a run writes; removed when a run starts afresh in a folder whose earlier run never checkpointed
RUN_FILES = ("results.jsonl", "summary.json", "done", "resumes.jsonl", "skipped_images.txt", *EXPORTS.values())
RUN_FOLDERS = ("tb", "checkpoints")


_HELD_LOCKS: dict[int, int] = {}  # lock fd -> pid of the process that took it


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunDir:
    """One run folder. Use as a context manager (or ``lock()``/``unlock()``) while writing to it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ lock
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
        self._remove_temporary_files()

    def _remove_temporary_files(self) -> None:
        """Delete the temporary files of checkpoint writes that a kill interrupted (only the lock holder writes
        them): everything ``.*.tmp`` in ``checkpoints/``, and those of the manifest and exports."""
        names = (MANIFEST, *EXPORTS.values())
        leftovers = list((self.path / "checkpoints").glob(".*.tmp"))
        leftovers += [p for n in names for p in self.path.glob(f".{n}.*.tmp")]
        for path in leftovers:
            try:
                path.unlink()
            except OSError:
                pass

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
        if self._lock_fd is not None:
            if _HELD_LOCKS.get(self._lock_fd) == os.getpid():  # (in a forked child the fd is closed already)
                del _HELD_LOCKS[self._lock_fd]
                os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def __enter__(self) -> RunDir:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    # ------------------------------------------------------------------ plain files
    def _guard(self, fn: Callable[[], Any], path: Path, what: str = "write", extra: str = "") -> Any:
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
        self._guard(lambda: atomic_write(path, lambda tmp: Path(tmp).write_text(text)), path)
        return path

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def clear_leftovers(self) -> list[str]:
        """Remove the files of an earlier run that stopped before its first checkpoint; returns their names."""
        removed = []
        for name in RUN_FILES:
            if (self.path / name).exists():
                self._guard((self.path / name).unlink, self.path / name, "remove")
                removed.append(name)
        for name in RUN_FOLDERS:
            if (self.path / name).is_dir():
                self._guard(partial(shutil.rmtree, self.path / name), self.path / name, "remove")
                removed.append(name + "/")
        return removed

    # ------------------------------------------------------------------ history (results.jsonl and the like)
    def read_rows(self, name: str = "results.jsonl") -> list[dict[str, Any]]:
        path = self.path / name
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
        return rows

    def append_row(self, row: dict[str, Any], name: str = "results.jsonl") -> None:
        """Append one JSON line and flush it to disk."""
        path = self.path / name

        def write() -> None:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())

        self._guard(write, path)

    def truncate_rows(self, keep: Callable[[dict[str, Any]], bool], name: str = "results.jsonl") -> list[dict]:
        """Rewrite ``name`` with only the rows for which ``keep(row)``; returns them."""
        rows = [r for r in self.read_rows(name) if keep(r)]
        self.write_text(name, "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    # ------------------------------------------------------------------ checkpoints
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def has_checkpoint(self) -> bool:
        """True when a checkpoint can be resumed (or an older asg's ``state.pt`` is there)."""
        return self.manifest_path.exists() or (self.path / "state.pt").exists()

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            if (self.path / "state.pt").exists():
                raise RunFolderError(
                    f"{self.path} was written by an older asg (state.pt without {MANIFEST}); its weights and state "
                    "may be from different steps, so it cannot be resumed safely: start a new run"
                )
            raise RunFolderError(f"cannot resume: {self.manifest_path} does not exist (no checkpoint in this folder)")
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"cannot read {self.manifest_path}: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise RunFolderError(f"{self.manifest_path}: unknown checkpoint format {manifest.get('format')!r}")
        return manifest

    def _verified(self, entry: dict[str, Any], step: int) -> Path:
        """The path of a manifest entry after checking it exists, has its step and its SHA-256."""
        path = self.path / entry["file"]
        advice = "the folder was changed by hand or the disk lost data; start a new run or restore a backup"
        if not path.is_file():
            raise RunFolderError(f"checkpoint file {path} named in {self.manifest_path} is missing; {advice}")
        if entry.get("step") != step:
            raise RunFolderError(f"{path} is from step {entry.get('step')}, the manifest from step {step}; {advice}")
        if sha256(path) != entry["sha256"]:
            raise RunFolderError(f"{path} does not match its checksum in {self.manifest_path}; {advice}")
        return path

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any], Path]:
        """(manifest, trainer state, weights path) of the committed checkpoint, each file verified."""
        manifest = self.read_manifest()
        step = manifest["step"]
        weights = self._verified(manifest["weights"], step)
        state = load_state(self._verified(manifest["state"], step))
        for entry in manifest.get("best", {}).values():
            self._verified(entry, entry["step"])
        if state.get("step") != step:
            raise RunFolderError(f"{manifest['state']['file']} holds step {state.get('step')}, not {step}")
        return manifest, state, weights

    def _entry(self, path: Path, step: int) -> dict[str, Any]:
        return {"file": str(path.relative_to(self.path)), "step": step, "sha256": sha256(path)}

    def write_weights(self, name: str, weights: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        """Write ``checkpoints/<name>.safetensors`` (immutable) and return its manifest entry."""
        path = self.path / "checkpoints" / f"{name}.safetensors"
        self._guard(lambda: save_weights(weights, path, {"step": str(step)}), path, extra=self._kept())
        return self._entry(path, step)

    def save_checkpoint(
        self,
        step: int,
        weights: dict[str, torch.Tensor],
        state: dict[str, Any],
        best: dict[str, dict[str, Any]],
        evaluated_through: int | None,
    ) -> None:
        """Write the step's files, then the manifest (the commit point), then drop files no longer named."""
        tag = f"step_{step:07d}"
        entry_w = self.write_weights(tag, weights, step)
        path_s = self.path / "checkpoints" / f"{tag}.state.pt"
        self._guard(lambda: save_state({**state, "step": step}, path_s), path_s, extra=self._kept())
        self.commit({"step": step, "weights": entry_w, "state": self._entry(path_s, step), "best": best,
                     "evaluated_through": evaluated_through})  # fmt: skip

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write ``checkpoint.json`` atomically, refresh the exported links, delete unnamed checkpoint files."""
        manifest = {"format": FORMAT, **manifest, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        text = json.dumps(manifest, indent=1)
        self._guard(lambda: atomic_write(self.manifest_path, lambda tmp: Path(tmp).write_text(text)),
                    self.manifest_path, extra=self._kept())  # fmt: skip
        self.sync_files(manifest)

    def update_manifest(self, **fields: Any) -> None:
        """Commit the current manifest with ``fields`` changed (e.g. ``best``, ``evaluated_through``)."""
        manifest = self.read_manifest()
        manifest.update(fields)
        self.commit(manifest)

    def sync_files(self, manifest: dict[str, Any] | None = None) -> None:
        """Make the folder match the manifest: exports link to its files, other checkpoint files go."""
        manifest = manifest or self.read_manifest()
        named = {manifest["weights"]["file"], manifest["state"]["file"]}
        named |= {e["file"] for e in manifest.get("best", {}).values()}
        folder = self.path / "checkpoints"
        for path in folder.iterdir() if folder.is_dir() else []:
            if str(path.relative_to(self.path)) not in named and not path.name.startswith("."):
                path.unlink(missing_ok=True)
        targets = {"last": manifest["weights"]["file"]} | {k: e["file"] for k, e in manifest.get("best", {}).items()}
        for rule, export in EXPORTS.items():
            if rule in targets:
                self._export(self.path / targets[rule], self.path / export)
            else:
                (self.path / export).unlink(missing_ok=True)

    def _export(self, src: Path, dst: Path) -> None:
        if dst.exists() and os.path.samefile(src, dst):
            return

        def link(tmp: str) -> None:
            os.unlink(tmp)
            try:
                os.link(src, tmp)
            except OSError:  # no hard links on this filesystem
                shutil.copyfile(src, tmp)

        self._guard(lambda: atomic_write(dst, link), dst)

    def _kept(self) -> str:
        if not self.manifest_path.exists():
            return " (no checkpoint had been written yet)"
        try:
            step = json.loads(self.manifest_path.read_text())["step"]
        except (OSError, ValueError, KeyError):
            return ""
        return f" (the checkpoint of step {step} is kept)"

    def read_checkpoint(self, checkpoint: str, attempts: int = 3) -> tuple[Path, bytes]:
        """(path, bytes) of ``resolve(checkpoint)``, read at once; a file that a running training deleted between
        the manifest and the read (it committed a newer checkpoint) is looked up again."""
        for attempt in range(attempts):
            path = self.resolve(checkpoint)
            try:
                with open(path, "rb") as f:  # once open, a deletion by the trainer cannot take the bytes away
                    return path, f.read()
            except FileNotFoundError:
                if attempt == attempts - 1:
                    break
                time.sleep(0.2)
        found = ", ".join(sorted(f.name for f in self.path.glob("*.safetensors"))) or "none"
        raise RunFolderError(f"checkpoint {path} does not exist (checkpoints in {self.path}: {found})")

    def resolve(self, checkpoint: str) -> Path:
        """The weights file of ``last``, ``source-val`` or ``oracle`` per the manifest (exports as fallback)."""
        if self.manifest_path.exists():
            manifest = self.read_manifest()
            if checkpoint == "last":
                return self.path / manifest["weights"]["file"]
            if checkpoint in manifest.get("best", {}):
                return self.path / manifest["best"][checkpoint]["file"]
        return self.path / EXPORTS[checkpoint]
