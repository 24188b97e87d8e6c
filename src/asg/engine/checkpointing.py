"""The run folder's side of training: open it (refuse, resume or start), restore a checkpoint, save checked ones.

A checkpoint is written only after the weights pass the pre-save guard (finite, and a loss on the last batch that
has not exploded), and before the step is evaluated, so a bad evaluation image cannot cost the step. Only rank 0
writes; the decision to save is taken on every rank alike (the guard's loss is rank-averaged).

:class:`Checkpointer` is given what it uses (the folder, the config, the model, the processes, the precision, the
loss guard); the loop hands it the rest at each call (the step, the trainer's state, the evaluator's selections)
and applies a restored checkpoint itself (:class:`Restored`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from asg.config import Config
from asg.data import DataBundle, set_skip_log
from asg.engine.distributed import Dist
from asg.engine.guards import LossGuard, diverged, non_finite_tensors
from asg.engine.precision import Precision
from asg.engine.rundir.folder import TRAINING, RunDir
from asg.engine.rundir.model_info import write_model_info
from asg.engine.rundir.resume import check_resume_changes
from asg.engine.rundir.weights import load_weights, weights_to_save
from asg.models.base_weights import check_base_weights, read_record, write_record


@dataclass(frozen=True)
class Restored:
    """A checkpoint read back: its step, the trainer's state, the selected weights and the last evaluated step."""

    step: int
    state: dict[str, Any]  # what ``Trainer.state_dict`` saved
    best: dict[str, dict[str, Any]]  # rule -> {step, score, set, file, sha256}
    evaluated_through: int | None


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


class Checkpointer:
    """Checkpoints of ``run_dir`` (None: an in-memory run, which saves nothing) for ``model`` trained by ``cfg``."""

    def __init__(
        self,
        run_dir: RunDir | None,
        cfg: Config,
        model: nn.Module,
        dist: Dist,
        precision: Precision,
        loss_guard: LossGuard,
        say: Callable[[str], None] = _stderr,
    ) -> None:
        self.run_dir, self.cfg, self.model, self.dist = run_dir, cfg, model, dist
        self.precision, self.loss_guard, self.say = precision, loss_guard, say
        self.committed_step: int | None = None  # step of the checkpoint on disk

    def due(self, step: int) -> bool:
        every = self.cfg.train.checkpoint_every
        return self.run_dir is not None and (step % every == 0 or step == self.cfg.train.steps)

    def kept(self) -> str:
        """What a run stopped now leaves on disk (for error messages)."""
        if self.run_dir is None:
            return "nothing is saved (in-memory run)"
        if self.committed_step is not None:
            return f"the last good checkpoint (step {self.committed_step}, {self.run_dir.manifest_path}) is kept"
        return "no checkpoint was written yet"

    # ------------------------------------------------------------------ opening
    def open(self, resume: bool, data: DataBundle, skipped: list[str], apply: Callable[[Restored], None]) -> None:
        """Rank 0: refuse a finished or foreign run, restore (``resume``) or clear leftovers, write config, versions
        and the list of ``skipped`` images. Then the other ranks read the checkpoint rank 0 has verified. A
        restored checkpoint's weights go into the model, the rest to ``apply``."""
        main = self.dist.is_main
        self.dist.together((lambda: self._open_main(resume, data, skipped, apply)) if main else None)
        self.dist.together((lambda: self.restore(apply)) if resume and not main else None)

    def _open_main(self, resume: bool, data: DataBundle, skipped: list[str], apply: Callable[[Restored], None]) -> None:
        rd, cfg = self.run_dir, self.cfg
        assert rd is not None
        removed = rd.begin(resume)  # refuses a finished run, or a run's folder without --resume
        if removed:
            self.say(TRAINING.fresh_note(rd.path, removed))
        if resume:
            # the frozen parts and the teacher are rebuilt from the recipe's files: the same bytes, or a refusal
            check_base_weights(read_record(rd.path), cfg.model, "resume", ("model.weights", "model.guidance_file"))
            self.restore(apply)
        else:
            write_record(rd, cfg.model)  # base_weights.json: the files the model was built from
        rd.write_config(cfg)
        write_model_info(rd, cfg, data, self.model)  # what `asg predict` needs beyond the weights
        compiled = cfg.train.compile_backend if cfg.train.compile else None
        rd.write_versions(world_size=self.dist.world, **self.precision.describe(cfg.model.channels_last, compiled))
        skip_log = rd.path / "skipped_images.txt"
        if skipped:
            rd.write_text(skip_log.name, "".join(line + "\n" for line in skipped))
            self.say(
                f"asg: warning: left out {len(skipped)} missing or empty image(s) (data.on_bad_image=skip); "
                f"they and any image that fails to decode later are listed in {skip_log}"
            )
        if cfg.data.on_bad_image == "skip":
            set_skip_log(data, skip_log)

    def restore(self, apply: Callable[[Restored], None]) -> None:
        """Load the committed checkpoint: its weights into the model, the rest to ``apply``; rank 0 also notes
        changes and makes the folder match."""
        rd = self.run_dir
        assert rd is not None
        manifest, state, weights = rd.load_checkpoint()
        step = int(manifest["step"])
        if self.dist.is_main:
            self._note_resume(step, int(state.get("world_size", 1)))
        load_weights(self.model, weights)
        self.committed_step = step
        apply(Restored(step, state, dict(manifest.get("best", {})), manifest.get("evaluated_through")))
        if self.dist.is_main:
            rd.sync_files(manifest)
        self.say(f"resumed {rd.path} at step {step}/{self.cfg.train.steps}")

    def _note_resume(self, step: int, saved_world: int) -> None:
        """Say (and append to resumes.jsonl) which settings and number of processes changed since the save."""
        rd, world = self.run_dir, self.dist.world
        assert rd is not None
        row: dict[str, Any] = {"step": step}
        if rd.config_path.is_file():
            changes = check_resume_changes(rd.read_config(), self.cfg, step)
            if changes:
                listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
                self.say(f"asg: note: resuming with changed settings, applied from step {step} on: {listed}")
                row["changes"] = {k: list(v) for k, v in changes.items()}
        if saved_world != world:
            self.say(
                f"asg: note: the checkpoint of step {step} was saved by {saved_world} process(es) and resumes "
                f"on {world}; data.batch_size={self.cfg.data.batch_size} is the global batch, so batches and "
                "augmentations continue as before"
            )
            row["world_size"] = [saved_world, world]
        if len(row) > 1:
            rd.append_row(row, "resumes.jsonl")

    # ------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        state: Callable[[], dict[str, Any]],
        best: dict[str, dict[str, Any]],
        evaluated_through: int | None,
        last_loss: Callable[[], float | None],
    ) -> None:
        """Check the weights, then commit a checkpoint of ``step`` (on every rank; rank 0 writes ``state()``).

        ``best``: the selected weights so far; ``evaluated_through``: the last evaluated step; ``last_loss``: the
        rank-averaged loss of the current weights on the last batch (a collective: every rank calls it)."""
        if self.run_dir is None:
            return
        self._check_before_save(step, last_loss)  # on every rank: its loss is reduced, so all ranks decide alike
        rd = self.run_dir

        def write() -> None:
            rd.save_checkpoint(step, weights_to_save(self.model), state(), best, evaluated_through)

        self.dist.together(write if self.dist.is_main else None)
        self.committed_step = step

    def _check_before_save(self, step: int, last_loss: Callable[[], float | None]) -> None:
        """Refuse to checkpoint weights that are non-finite or whose loss on the last batch has exploded."""
        bad = non_finite_tensors(self.model)
        if bad:
            raise diverged("non-finite weights", {"tensors": len(bad)}, step, self.kept(), f" (first: {bad[0]})")
        loss = last_loss()
        if loss is not None and self.loss_guard.exploded(loss):
            raise diverged(
                "exploded loss of the weights to be saved",
                {"loss": loss, "scale": self.loss_guard.scale},
                step,
                self.kept(),
            )
