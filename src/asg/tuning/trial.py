"""One trial as an ordinary run: the recipe, the study's common overrides and the trial's parameters."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from asg.engine.distributed import Dist
from asg.engine.rundir.folder import RunDir
from asg.engine.trainer import Trainer
from asg.errors import AsgError
from asg.l2o import build_controller
from asg.registries import check_registry_names, load_checked_config
from asg.tuning.pruning import SCORE_FILE, TrialReporter
from asg.tuning.spec import SweepSpec
from asg.workers import shared_data


def trial_overrides(spec: SweepSpec, params: list[str], number: int) -> list[str]:
    """Every override of a trial's run, in order: the study's, the trial's parameters, its name."""
    return [*spec.overrides, *params, f"name={spec.name}_trial{number:04d}"]


def run_trial(
    spec: SweepSpec,
    params: list[str],
    folder: Path,
    trial: optuna.Trial | None,
    rule: str,
    dist: Dist,
    quiet: bool = True,
) -> tuple[TrialState, float | None, str]:
    """Train (or resume, or read back) the trial's run; (state, last source-val score, a line saying how it ended).

    A run that stops on an error (a NaN loss at a too-high rate, say) is a failed trial, not a failed sweep.
    """
    number = trial.number if trial is not None else -1
    rd = RunDir(folder)
    over = trial_overrides(spec, params, int(folder.name) if folder.name.isdigit() else number)
    reporter = TrialReporter(trial, rule)
    try:
        if not rd.is_done():
            resume = rd.has_progress()
            cfg = check_registry_names(rd.read_config(over)) if resume else load_checked_config(spec.recipe, over)
            Trainer(
                cfg,
                folder,
                data=shared_data(cfg.data),
                resume=resume,
                quiet=quiet,
                dist=dist,
                controller_factory=build_controller,
                callbacks=[reporter],
            ).fit()
        if not dist.is_main:  # rank 0 alone writes and reads the run folder
            return TrialState.COMPLETE, None, ""
        summary = rd.read_summary()
    except optuna.TrialPruned as pruned:
        return TrialState.PRUNED, None, str(pruned)
    except AsgError as exc:
        print(f"asg sweep: trial {number} ({folder}) failed: {exc}", file=sys.stderr, flush=True)
        return TrialState.FAIL, None, f"failed: {exc}"
    value = reporter.last_score
    recorded = rd.read_json(SCORE_FILE) if value is None else None
    if recorded is not None:  # a finished folder read back (a retried trial)
        value = float(recorded["score"])
    if value is None:
        return TrialState.FAIL, None, f"failed: {folder} finished without a source-val evaluation"
    steps = summary.steps if summary is not None else "?"
    return TrialState.COMPLETE, value, f"complete at step {steps}: source-val score {value:.4f}"
