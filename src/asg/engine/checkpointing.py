"""The run folder's side of training: open it (refuse, resume or start), restore a checkpoint, save checked ones.

A checkpoint is written only after the weights pass the pre-save guard (finite, and a loss on the last batch that
has not exploded), and before the step is evaluated, so a bad evaluation image cannot cost the step. Only rank 0
writes; the decision to save is taken on every rank alike (the guard's loss is rank-averaged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asg.data import set_skip_log
from asg.engine.checkpoint import load_weights, weights_to_save
from asg.engine.guards import diverged, non_finite_tensors
from asg.engine.model_info import write_model_info
from asg.engine.resume import check_resume_changes
from asg.engine.rundir import TRAINING, RunDir
from asg.models.base_weights import check_base_weights, read_record, write_record

if TYPE_CHECKING:
    from asg.engine.trainer import Trainer


class Checkpointer:
    """Checkpoints of ``run_dir`` (None: an in-memory run, which saves nothing)."""

    def __init__(self, run_dir: RunDir | None) -> None:
        self.run_dir = run_dir
        self.committed_step: int | None = None  # step of the checkpoint on disk

    def due(self, trainer: Trainer) -> bool:
        every = trainer.cfg.train.checkpoint_every
        return self.run_dir is not None and (trainer.step % every == 0 or trainer.step == trainer.cfg.train.steps)

    def kept(self) -> str:
        """What a run stopped now leaves on disk (for error messages)."""
        if self.run_dir is None:
            return "nothing is saved (in-memory run)"
        if self.committed_step is not None:
            return f"the last good checkpoint (step {self.committed_step}, {self.run_dir.manifest_path}) is kept"
        return "no checkpoint was written yet"

    # ------------------------------------------------------------------ opening
    def open(self, trainer: Trainer) -> None:
        """Rank 0: refuse a finished or foreign run, restore or clear leftovers, write config, versions and the
        list of skipped images. Then the other ranks read the checkpoint rank 0 has verified."""
        main = trainer.dist.is_main
        trainer.dist.together((lambda: self._open_main(trainer)) if main else None)
        trainer.dist.together((lambda: self.restore(trainer)) if trainer.resume and not main else None)

    def _open_main(self, trainer: Trainer) -> None:
        rd, cfg = self.run_dir, trainer.cfg
        assert rd is not None
        removed = rd.begin(trainer.resume)  # refuses a finished run, or a run's folder without --resume
        if removed:
            trainer.say(TRAINING.fresh_note(rd.path, removed))
        if trainer.resume:
            # the frozen parts and the teacher are rebuilt from the recipe's files: the same bytes, or a refusal
            check_base_weights(read_record(rd.path), cfg.model, "resume", ("model.weights", "model.guidance_file"))
            self.restore(trainer)
        else:
            write_record(rd, cfg.model)  # base_weights.json: the files the model was built from
        rd.write_config(cfg)
        write_model_info(rd, cfg, trainer.data, trainer.model)  # what `asg predict` needs beyond the weights
        compiled = cfg.train.compile_backend if cfg.train.compile else None
        rd.write_versions(
            world_size=trainer.dist.world, **trainer.precision.describe(cfg.model.channels_last, compiled)
        )
        skip_log = rd.path / "skipped_images.txt"
        if trainer.skipped:
            rd.write_text(skip_log.name, "".join(line + "\n" for line in trainer.skipped))
            trainer.say(f"asg: warning: left out {len(trainer.skipped)} missing or empty image(s) "
                        "(data.on_bad_image=skip); they and any image that fails to decode later are listed in "
                        f"{skip_log}")  # fmt: skip
        if cfg.data.on_bad_image == "skip":
            set_skip_log(trainer.data, skip_log)

    def restore(self, trainer: Trainer) -> None:
        """Load the committed checkpoint into ``trainer``; rank 0 also notes changes and makes the folder match."""
        rd = self.run_dir
        assert rd is not None
        manifest, state, weights = rd.load_checkpoint()
        step = int(manifest["step"])
        if trainer.dist.is_main:
            self._note_resume(trainer, step, int(state.get("world_size", 1)))
        load_weights(trainer.model, weights)
        trainer.load_state_dict(state)
        trainer.step = self.committed_step = step
        evaluated = manifest.get("evaluated_through")
        trainer.evaluator.restore(dict(manifest.get("best", {})), evaluated, rd, main=trainer.dist.is_main)
        if trainer.dist.is_main:
            rd.sync_files(manifest)
        trainer.say(f"resumed {rd.path} at step {step}/{trainer.cfg.train.steps}")

    def _note_resume(self, trainer: Trainer, step: int, saved_world: int) -> None:
        """Say (and append to resumes.jsonl) which settings and number of processes changed since the save."""
        rd, world = self.run_dir, trainer.dist.world
        assert rd is not None
        row: dict[str, Any] = {"step": step}
        if rd.config_path.is_file():
            changes = check_resume_changes(rd.read_config(), trainer.cfg, step)
            if changes:
                listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
                trainer.say(f"asg: note: resuming with changed settings, applied from step {step} on: {listed}")
                row["changes"] = {k: list(v) for k, v in changes.items()}
        if saved_world != world:
            trainer.say(f"asg: note: the checkpoint of step {step} was saved by {saved_world} process(es) and "
                        f"resumes on {world}; data.batch_size={trainer.cfg.data.batch_size} is the global batch, so "
                        "batches and augmentations continue as before")  # fmt: skip
            row["world_size"] = [saved_world, world]
        if len(row) > 1:
            rd.append_row(row, "resumes.jsonl")

    # ------------------------------------------------------------------ saving
    def save(self, trainer: Trainer) -> None:
        """Check the weights, then commit a checkpoint of this step (on every rank; rank 0 writes)."""
        if self.run_dir is None:
            return
        self._check_before_save(trainer)  # on every rank: its loss is reduced, so all ranks decide alike
        trainer.dist.together((lambda: self._write(trainer)) if trainer.dist.is_main else None)
        self.committed_step = trainer.step

    def _write(self, trainer: Trainer) -> None:
        assert self.run_dir is not None
        history = trainer.evaluator.history
        evaluated = history[-1]["step"] if history else None
        self.run_dir.save_checkpoint(
            trainer.step, weights_to_save(trainer.model), trainer.state_dict(), trainer.evaluator.best, evaluated
        )

    def _check_before_save(self, trainer: Trainer) -> None:
        """Refuse to checkpoint weights that are non-finite or whose loss on the last batch has exploded."""
        bad = non_finite_tensors(trainer.model)
        if bad:
            raise diverged(
                "non-finite weights", {"tensors": len(bad)}, trainer.step, self.kept(), f" (first: {bad[0]})"
            )
        loss = trainer.stepper.last_batch_loss()
        if loss is not None and trainer.loss_guard.exploded(loss):
            raise diverged("exploded loss of the weights to be saved",
                           {"loss": loss, "scale": trainer.loss_guard.scale}, trainer.step, self.kept())  # fmt: skip
