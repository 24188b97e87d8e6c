"""The run folder's checkpoints: immutable step-named files tied together by the manifest ``checkpoint.json``.

Each checkpoint is a set of files under ``checkpoints/`` (weights in safetensors, trainer state in a weights-only
torch file, the best-so-far weights per selection rule) named by the manifest, written last and atomically with
every file's step and SHA-256. Files no manifest names are deleted only after the manifest that replaces them is
on disk, so a crash at any moment leaves the previous checkpoint whole. ``last.safetensors`` and
``best_*.safetensors`` in the folder are hard links (or copies) of the manifest's files, for users and
``asg evaluate``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from asg.engine.rundir.lock import LockedFolder, RunFolderError
from asg.engine.rundir.weights import load_state, save_state, save_weights
from asg.io import atomic_write, atomic_write_text, sha256_file

MANIFEST = "checkpoint.json"
FORMAT = 1
EXPORTS = {"last": "last.safetensors", "source-val": "best_source_val.safetensors", "oracle": "best_oracle.safetensors"}


class CheckpointFiles(LockedFolder):
    """The checkpoint part of a run folder: write, commit, verify, resume and export checkpoints."""

    def _after_lock(self) -> None:
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

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        """The committed manifest; RunFolderError when there is none, it is unreadable or of another format."""
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
        if sha256_file(path) != entry["sha256"]:
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
        return {"file": str(path.relative_to(self.path)), "step": step, "sha256": sha256_file(path)}

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
        try:
            entry_w = self.write_weights(tag, weights, step)
            path_s = self.path / "checkpoints" / f"{tag}.state.pt"
            self._guard(lambda: save_state({**state, "step": step}, path_s), path_s, extra=self._kept())
            self.commit(
                {
                    "step": step,
                    "weights": entry_w,
                    "state": self._entry(path_s, step),
                    "best": best,
                    "evaluated_through": evaluated_through,
                }
            )
        except RunFolderError as exc:
            self._drop_uncommitted(tag, step)  # a weight file the commit never named must not fill the disk
            if self.manifest_path.exists():
                raise
            # nothing was committed: a resume would be refused, the same command starts the run again
            raise RunFolderError(str(exc).replace(", then resume with --resume", "")) from None

    def _drop_uncommitted(self, tag: str, step: int) -> None:
        """Remove the files of checkpoint ``tag`` unless the manifest commits that step."""
        try:
            committed = self.manifest_path.exists() and int(self.read_manifest()["step"]) == step
        except Exception:  # an unreadable manifest: keep everything
            return
        if not committed:
            for path in (self.path / "checkpoints").glob(f"{tag}.*"):
                path.unlink(missing_ok=True)

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write ``checkpoint.json`` atomically, refresh the exported links, delete unnamed checkpoint files."""
        manifest = {"format": FORMAT, **manifest, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        text = json.dumps(manifest, indent=1)
        self._guard(lambda: atomic_write_text(self.manifest_path, text), self.manifest_path, extra=self._kept())
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
            return " (no checkpoint had been written yet: rerun the same command, without --resume)"
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
