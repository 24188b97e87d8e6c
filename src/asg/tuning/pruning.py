"""The trial's side of the training loop: report the source-val score at each evaluation, stop when pruned.

The score is the source-val primary metric with ties broken by the source-val loss (``trial_score``).

Rank 0 reports to the study and asks the pruner; the decision is broadcast so that every rank of a ``torchrun``
trial stops at the same step (``on_eval_end`` runs on every rank, so the collective is reached by all).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import optuna
import torch

from asg.engine.callbacks import Callback, Loop
from asg.io import atomic_write_text

if TYPE_CHECKING:
    from asg.engine.evaluation.metrics import EvalResult

SCORE_FILE = "trial_score.json"  # the last evaluation's score (step, score)
PRUNED_FILE = "pruned.json"  # in a pruned trial's run folder: the step, score and rule that stopped it


def trial_score(primary: float, trainer: Loop) -> float:
    """The score a study maximises: the source-val primary metric (accuracy, mIoU), ties broken by the lower
    source-val cross-entropy. A synthetic split often saturates (every trial of the digits at 100 %), and the
    first of equal scores would then be an arbitrary choice; ``loss / 1000`` stays below the smallest accuracy
    step of any split under 1,000 images (one image in 300 is 0.0033) for losses under 3.3."""
    with torch.no_grad():
        loss = trainer.source_val_loss(max_batches=1 << 30)  # the whole split, in order: no random draw
    return primary - min(loss, 3.0) / 1000.0


class TrialReporter(Callback):
    """Reports each evaluation's source-val score to ``trial`` (rank 0; None elsewhere) and stops a pruned run.

    The last evaluation (``train.steps``) is reported but never pruned: the run is complete by then.
    """

    def __init__(self, trial: optuna.Trial | None, rule: str = "") -> None:
        self.trial, self.rule = trial, rule
        self.last_score: float | None = None

    def on_eval_end(self, trainer: Loop, row: dict[str, Any], results: dict[str, EvalResult]) -> None:
        name = trainer.data.source_val_name
        if name is None or name not in results:
            return
        score = trial_score(float(results[name].primary), trainer)
        self.last_score = score
        prune = False
        if trainer.run_dir is not None and trainer.dist.is_main:  # read back by a retry of a finished run
            atomic_write_text(trainer.run_dir.path / SCORE_FILE, json.dumps({"step": trainer.step, "score": score}))
        if trainer.dist.is_main and self.trial is not None:
            self.trial.report(score, trainer.step)
            prune = trainer.step < trainer.cfg.train.steps and self.trial.should_prune()
        if not trainer.dist.broadcast_object(prune):
            return
        reason = (
            f"pruned at step {trainer.step} of {trainer.cfg.train.steps}: source-val score {score:.4f} ({self.rule})"
        )
        if trainer.run_dir is not None and trainer.dist.is_main:
            note = {
                "step": trainer.step,
                "steps": trainer.cfg.train.steps,
                "source_val": score,
                "rule": self.rule,
                "trial": self.trial.number if self.trial is not None else None,
            }
            atomic_write_text(trainer.run_dir.path / PRUNED_FILE, json.dumps(note, indent=1))
        raise optuna.TrialPruned(reason)
