"""The run folder: one object that locks it, decides whether a run begins, resumes or is refused, writes its
files, keeps its checkpoints consistent and marks it done.

Training, meta-training, adaptation, the demo, the API and the CLI all go through :class:`RunDir`:

- **lock** (:mod:`asg.engine.rundir.lock`): one process writes a folder; a failed write is one line saying why.
- **checkpoints** (:mod:`asg.engine.rundir.manifest`): immutable step-named files committed by ``checkpoint.json``.
- **lifecycle** (here): :meth:`RunDir.begin` refuses a finished run, refuses a folder that holds a run unless it
  is resumed, and clears the leftovers of a run that stopped before it saved anything to resume from;
  :meth:`RunDir.finish` writes ``done`` atomically, last; :meth:`RunDir.is_done` reads it.
- **saved config**: ``config.yaml`` (:meth:`RunDir.write_config`, :meth:`RunDir.read_config`).
- **history**: ``results.jsonl``-like files of JSON rows, appended and flushed; a line cut by a crash is skipped
  when read; on resume the file is cut back to the rows the restored state has seen.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from asg.config import Config, config_to_dict, load_config
from asg.engine.rundir.lock import RunFolderError
from asg.engine.rundir.manifest import EXPORTS, MANIFEST, CheckpointFiles
from asg.engine.rundir.summary import RunSummary
from asg.errors import AsgError
from asg.utils import versions

CONFIG = "config.yaml"
DONE = "done"
SUMMARY = "summary.json"
# files a run writes; removed when a run starts afresh in a folder whose earlier run never checkpointed
RUN_FILES = ("results.jsonl", SUMMARY, DONE, "resumes.jsonl", "skipped_images.txt", *EXPORTS.values())
RUN_FOLDERS = ("tb", "checkpoints")


@dataclass(frozen=True)
class RunKind:
    """What one kind of run leaves in its folder, as :meth:`RunDir.begin` needs it.

    ``markers``: files whose presence means the folder holds progress to resume (the first is named when a
    resume finds none); ``missing``: why a resume without progress is refused (None: it starts afresh);
    ``stopped_before``: what a run without progress had not reached; ``leftovers``: the files and folders of such
    a run, removed when a run starts afresh.
    """

    noun: str = "run"
    markers: tuple[str, ...] = (MANIFEST, "state.pt")  # state.pt: an older asg's checkpoint (refused on resume)
    missing: str | None = "no checkpoint in this folder"
    stopped_before: str = "its first checkpoint"
    leftovers: tuple[str, ...] = RUN_FILES + RUN_FOLDERS

    @property
    def what(self) -> str:
        """The noun with its article ("a run", "an adaptation")."""
        return ("an " if self.noun[0] in "aeiou" else "a ") + self.noun

    def fresh_note(self, path: Path | str, removed: list[str]) -> str:
        """The note to print when :meth:`RunDir.begin` removed ``removed`` (empty: no note)."""
        if not removed:
            return ""
        return (
            f"asg: note: {path} held an earlier {self.noun} that stopped before {self.stopped_before}; "
            f"removed its {', '.join(removed)} and starting afresh"
        )


TRAINING = RunKind()  # `asg train` and every round of `asg adapt`


class RunDir(CheckpointFiles):
    """One run folder. Use as a context manager (or ``lock()``/``unlock()``) while writing to it."""

    # ------------------------------------------------------------------ lifecycle
    def begin(self, resume: bool, kind: RunKind = TRAINING, where: str | None = None) -> list[str]:
        """Decide, under the lock, whether the run in this folder may start: AsgError for a finished run, for a
        folder holding ``kind``'s progress without ``resume``, and (when ``kind.missing``) for a resume without
        progress; a run starting afresh first removes the leftovers of an earlier one, whose names are returned
        (``kind.fresh_note`` says so). ``where`` (e.g. "round 2 at step 40") names the point an earlier run
        stopped at in the refusal. The caller then restores its state when ``resume`` and progress exist."""
        if self.is_done():
            raise AsgError(
                f"{self.path} already finished (to continue it, remove its '{DONE}' file and pass "
                "--resume; or use another --out)"
            )
        if self.has_progress(kind):
            if not resume:
                stopped = f" that stopped in {where}" if where else " already"
                raise AsgError(
                    f"{self.path} holds {kind.what}{stopped}: pass --resume to continue it, or choose another --out"
                )
            return []
        if resume and kind.missing is not None:
            raise AsgError(f"cannot resume: {self.path / kind.markers[0]} does not exist ({kind.missing})")
        return self.clear_leftovers(kind.leftovers)

    def has_progress(self, kind: RunKind = TRAINING) -> bool:
        """True when one of ``kind``'s markers is in the folder (for training: a checkpoint)."""
        return any((self.path / name).exists() for name in kind.markers)

    def is_done(self) -> bool:
        """True when the run in this folder finished (its ``done`` file exists)."""
        return (self.path / DONE).exists()

    def finish(self) -> None:
        """Mark the run finished: write ``done`` (the time) atomically; call it after every other file."""
        self.write_text(DONE, time.strftime("%Y-%m-%d %H:%M:%S\n"))

    def clear_leftovers(self, names: tuple[str, ...] = RUN_FILES + RUN_FOLDERS) -> list[str]:
        """Remove the files and folders ``names`` of an earlier run; returns those removed (folders with "/")."""
        removed = []
        for name in names:
            path = self.path / name
            if path.is_dir():
                self._guard(partial(shutil.rmtree, path), path, "remove")
                removed.append(name + "/")
            elif path.exists():
                self._guard(path.unlink, path, "remove")
                removed.append(name)
        return removed

    # ------------------------------------------------------------------ saved config and versions
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def write_config(self, cfg: Config) -> None:
        """Save the resolved config as ``config.yaml`` (atomically)."""
        self.write_text(CONFIG, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    def read_config(self, overrides: list[str] | None = None, missing: str | None = None) -> Config:
        """The saved config plus ``overrides``; AsgError ``missing`` (default: not a run folder) without one."""
        if not self.config_path.is_file():
            raise AsgError(missing or f"{self.path} is not a run folder: {self.config_path} does not exist")
        return load_config(self.config_path, overrides)

    def write_versions(self, **extra: Any) -> None:
        """``versions.json``: the library versions (``asg.utils.versions``) plus ``extra``."""
        self.write_text("versions.json", json.dumps({**versions(), **extra}, indent=1))

    def read_json(self, name: str) -> Any:
        """The JSON file ``name`` (written whole by ``write_text``), or None when it does not exist."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"cannot read {path}: {exc}") from None

    def read_text(self, name: str) -> str | None:
        """The text of ``name``, or None when it does not exist."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return path.read_text()
        except OSError as exc:
            raise RunFolderError(f"cannot read {path}: {exc.strerror or exc}") from None

    def read_lines(self, name: str) -> list[str]:
        """The lines of the text file ``name`` ([] without the file)."""
        return (self.read_text(name) or "").splitlines()

    # ------------------------------------------------------------------ summary.json
    def write_summary(self, summary: RunSummary) -> None:
        """Write ``summary.json`` (atomically)."""
        self.write_text(SUMMARY, json.dumps(summary.to_dict(), indent=1))

    def read_summary(self) -> RunSummary | None:
        """The run's ``summary.json`` (any version), or None when the run has not written it."""
        data = self.read_json(SUMMARY)
        if data is None:
            return None
        if not isinstance(data, dict):
            raise RunFolderError(f"cannot read {self.path / SUMMARY}: not a JSON object")
        try:
            return RunSummary.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise RunFolderError(f"cannot read {self.path / SUMMARY}: {type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ history (results.jsonl and the like)
    def read_rows(self, name: str = "results.jsonl") -> list[dict[str, Any]]:
        """The JSON rows of ``name`` ([] without the file); a line cut by a crash mid-write, or blank, is skipped."""
        path = self.path / name
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
            if isinstance(row, dict):
                rows.append(row)
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
