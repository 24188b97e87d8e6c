"""ASHA in trial order: successive halving whose decisions do not depend on how many workers run the study.

Optuna's :class:`~optuna.pruners.SuccessiveHalvingPruner` is asynchronous: a trial reaching a rung is compared with
whichever trials reached that rung before it, so with two workers the decisions (and the study's choice) depend on
timing. :class:`InOrderASHA` compares trial *k* only with trials *0..k-1* (a retry counts as the trial it
replaces), and waits until each earlier trial still running has reached the rung or stopped. Those are the values
a one-worker study has when trial *k* gets there, so a seeded study prunes the same trials with any number of
workers. The price is waiting: a worker whose trial overtakes an earlier one idles until the earlier one catches
up. Earlier trials that nobody runs (a dead worker's trial waiting for its retry) are not waited for; the line
printed then says the decision may differ from a one-worker study's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from asg.tuning.storage import counted_trials


def order_of(trial: FrozenTrial) -> int:
    """The trial's place in the study: its number, or for a retry the number of the first trial it replaces."""
    return min([trial.number, *trial.user_attrs.get("retries", [])])


def earlier_trials(trials: list[FrozenTrial], trial: FrozenTrial) -> list[FrozenTrial]:
    """The trials a one-worker study would have run before ``trial``: the counted ones of lower place."""
    place = order_of(trial)
    return [t for t in counted_trials(trials) if order_of(t) < place]


def _rung_key(rung: int) -> str:
    return f"completed_rung_{rung}"  # the system attribute SuccessiveHalvingPruner writes at each rung


class _EarlierView:
    """The study as SuccessiveHalvingPruner reads it, showing only the earlier trials."""

    def __init__(self, study: optuna.Study, trials: list[FrozenTrial]) -> None:
        self._study, self._trials = study, trials

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return self._trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class InOrderASHA(optuna.pruners.SuccessiveHalvingPruner):
    """Successive halving (rungs at ``min_resource * reduction_factor**r`` steps, the top 1/``reduction_factor``
    of each rung continue) decided in trial order; see the module docstring.

    ``recover(study)`` runs at each poll while waiting: it fails the trials of dead workers (so that nobody waits
    for them forever). ``poll_s`` is the wait between two reads of the storage.
    """

    def __init__(
        self,
        min_resource: int,
        reduction_factor: int = 3,
        recover: Callable[[optuna.Study], Any] | None = None,
        poll_s: float = 1.0,
    ) -> None:
        super().__init__(min_resource=min_resource, reduction_factor=reduction_factor)
        self.min_resource, self.reduction_factor = min_resource, reduction_factor
        self.recover, self.poll_s = recover, poll_s

    def _last_rung(self, trial: FrozenTrial) -> int | None:
        """The highest rung this report completes; None when it completes none."""
        step = trial.last_step
        if step is None:
            return None
        rung = 0
        while _rung_key(rung) in trial.system_attrs:
            rung += 1
        last = None
        while step >= self.min_resource * self.reduction_factor**rung:
            last, rung = rung, rung + 1
        return last

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        rung = self._last_rung(trial)
        if rung is None:
            return False
        key, told = _rung_key(rung), False
        while True:
            earlier = earlier_trials(study.get_trials(deepcopy=False), trial)
            running = [t for t in earlier if t.state == TrialState.RUNNING and key not in t.system_attrs]
            if not running:
                break
            if not told:
                print(
                    f"asg sweep: trial {trial.number} waits at step {trial.last_step} for trial(s) "
                    f"{', '.join(str(t.number) for t in running)} to reach it (ASHA in trial order)",
                    file=sys.stderr,
                    flush=True,
                )
                told = True
            if self.recover is not None:
                self.recover(study)
            time.sleep(self.poll_s)
        unrun = [t.number for t in earlier if t.state == TrialState.WAITING]
        if unrun:
            print(
                f"asg sweep: trial {trial.number} decided at step {trial.last_step} without trial(s) "
                f"{', '.join(map(str, unrun))}, which wait for a worker: this decision may differ from a one-worker "
                "study's",
                file=sys.stderr,
                flush=True,
            )
        return super().prune(_EarlierView(study, earlier), trial)  # type: ignore[arg-type]
