"""ASHA in trial order (asg.tuning.asha): the decisions of a one-worker study, whatever the workers' timing."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from asg.tuning.asha import InOrderASHA, earlier_trials, order_of

# per trial: its score at every step, and how long each step takes in the parallel runs. Trial 0 is slow, so
# trial 1 reaches the first rung (step 1) before it; one worker runs trial 0 first.
SCORES = [0.9, 0.5, 0.7, 0.95, 0.6]
SLOW = [0.6, 0.0, 0.05, 0.0, 0.1]
STEPS = 4  # rungs at steps 1 and 3 (min_resource 1, reduction factor 3); step 4 completes


def _study(pruner: optuna.pruners.BasePruner) -> tuple[optuna.Study, list[optuna.Trial]]:
    study = optuna.create_study(direction="maximize", pruner=pruner)
    return study, [study.ask() for _ in SCORES]


def _train(study: optuna.Study, trial: optuna.Trial, delay: float) -> None:
    for step in range(1, STEPS + 1):
        time.sleep(delay)
        trial.report(SCORES[trial.number], step)
        if step < STEPS and trial.should_prune():
            study.tell(trial, state=TrialState.PRUNED)
            return
    study.tell(trial, SCORES[trial.number])


def _outcome(pruner: optuna.pruners.BasePruner, parallel: bool) -> list[tuple[int, str, int]]:
    """(trial, state, last step) of each trial: one worker in trial order, or every trial at once, trial 0
    slowest."""
    study, trials = _study(pruner)
    if parallel:
        threads = [threading.Thread(target=_train, args=(study, t, SLOW[t.number])) for t in trials]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
    else:
        for t in trials:
            _train(study, t, 0.0)
    return [(t.number, t.state.name, t.last_step) for t in study.get_trials()]


def test_parallel_workers_make_the_decisions_of_one_worker():
    one = _outcome(optuna.pruners.SuccessiveHalvingPruner(1, 3), parallel=False)
    assert {s for _, s, _ in one} == {"COMPLETE", "PRUNED"}
    assert _outcome(InOrderASHA(1, 3, poll_s=0.01), parallel=False) == one  # the same algorithm as Optuna's
    assert _outcome(InOrderASHA(1, 3, poll_s=0.01), parallel=True) == one
    # what it fixes: Optuna's asynchronous pruner lets trial 1 through its first rung when it gets there first
    assert _outcome(optuna.pruners.SuccessiveHalvingPruner(1, 3), parallel=True) != one


def test_a_retry_takes_the_place_of_the_trial_it_replaces():
    study = optuna.create_study()
    t0, _ = study.ask(), study.ask()
    study.tell(t0, state=TrialState.FAIL)
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, user_attrs={"retries": [0]}))
    trials = study.get_trials()
    retry = trials[2]
    assert order_of(retry) == 0 and order_of(trials[1]) == 1
    assert earlier_trials(trials, trials[1]) == [retry]  # the failed trial 0 no longer counts; its retry does
    assert earlier_trials(trials, retry) == []


def test_an_earlier_trial_nobody_runs_is_not_waited_for(capfd):
    study, trials = _study(InOrderASHA(1, 3, poll_s=0.01))
    study.tell(trials[0], state=TrialState.FAIL)  # its worker died; the retry waits for a worker
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, user_attrs={"retries": [0]}))
    for t in trials[2:]:
        study.tell(t, state=TrialState.FAIL)
    trials[1].report(0.5, 1)
    assert trials[1].should_prune() is False  # the first value at its rung: promoted, without waiting
    assert "trial 1 decided at step 1 without trial(s) 5, which wait for a worker" in capfd.readouterr().err


def test_a_dead_worker_ends_the_wait():
    calls = []

    def recover(study: optuna.Study) -> None:  # what recover_dead_workers does for a dead pid
        calls.append(1)
        study.tell(study.get_trials()[0].number, state=TrialState.FAIL)

    study, trials = _study(InOrderASHA(1, 3, recover=recover, poll_s=0.01))
    for t in trials[2:]:
        study.tell(t, state=TrialState.FAIL)
    trials[1].report(0.5, 1)
    done = threading.Event()
    threading.Thread(target=lambda: (trials[1].should_prune(), done.set()), daemon=True).start()
    assert done.wait(10) and calls == [1]


@pytest.mark.parametrize("step, rung", [(1, 0), (2, 0), (3, 1), (9, 2)])
def test_the_rung_a_report_completes(step, rung):
    study, trials = _study(InOrderASHA(1, 3))
    trials[0].report(0.5, step)
    frozen = study.get_trials()[0]
    assert InOrderASHA(1, 3)._last_rung(frozen) == rung
