"""One study per (recipe, common overrides): its sampler, ASHA pruner, storage and the worker loop.

A worker asks the study for a trial, trains it as an ordinary run in ``<out>/trials/NNNN`` (seed and everything
else from the recipe and the common overrides; the trial's parameters as ``--set`` overrides), reports the
source-val score at each evaluation, and tells the study the last source-val score, or that the pruner stopped it.
Any number of workers (processes, machines, ``torchrun`` groups) may run the same command on one storage; the
study's budget of ``trials`` counts every trial once, retries included in the trial they replace.

Samplers draw each trial's parameters with a seed made of ``seed`` and the trial's number, so a study's trials do
not depend on which worker ran them, and two workers never draw the same random point.
"""

from __future__ import annotations

import json
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from asg.engine.distributed import Dist
from asg.io import atomic_write_text
from asg.registries import load_checked_config
from asg.tuning.asha import InOrderASHA
from asg.tuning.space import as_overrides, check_knob, grid_size, grid_space, method_knobs, suggest
from asg.tuning.spec import SweepSpec
from asg.tuning.storage import (
    RetryDeadWorker,
    counted_trials,
    make_storage,
    recover_dead_workers,
    worker_identity,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Study:
    """An opened study: the Optuna study, its storage, the search space and the run length."""

    def __init__(self, spec: SweepSpec) -> None:
        self.spec = spec
        self.cfg = load_checked_config(spec.recipe, list(spec.overrides))
        self.knobs = method_knobs(self.cfg, spec.ranges)
        for knob in self.knobs:
            check_knob(knob, self.cfg)
        steps, every = self.cfg.train.steps, self.cfg.train.eval_every
        self.min_resource = spec.min_resource or min(every, steps)
        self.budget = min(spec.trials, grid_size(self.knobs)) if spec.sampler == "grid" else spec.trials
        rf = spec.reduction_factor
        asha = f"rungs every x{rf} from step {self.min_resource}, top 1/{rf} of each rung continue"
        self.rule = {
            "asha": f"ASHA in trial order: {asha}",
            "asha-async": f"ASHA: {asha}",
            "none": "no pruning",
        }[spec.pruner]
        self.retry = RetryDeadWorker(spec.max_retries)
        self.storage: BaseStorage = make_storage(
            spec.storage, spec.out, spec.heartbeat_s, spec.grace_s, spec.max_retries
        )
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
        if spec.pruner == "asha":
            pruner = InOrderASHA(self.min_resource, rf, lambda s: recover_dead_workers(s, self.storage, self.retry))
        elif spec.pruner == "asha-async":
            pruner = optuna.pruners.SuccessiveHalvingPruner(self.min_resource, rf)
        self.study = optuna.create_study(
            storage=self.storage,
            study_name=spec.name,
            direction="maximize",
            sampler=self.sampler(0),
            pruner=pruner,
            load_if_exists=True,
        )
        self.study.set_user_attr("spec", json.loads(json.dumps(asdict(spec), default=str)))

    def sampler(self, number: int) -> optuna.samplers.BaseSampler:
        """The sampler of trial ``number``: seeded by the study's seed and the number."""
        seed = self.spec.seed * 1_000_003 + number
        if self.spec.sampler == "grid":
            return optuna.samplers.GridSampler(grid_space(self.knobs), seed=self.spec.seed)
        if self.spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def counted(self) -> list[optuna.trial.FrozenTrial]:
        """The trials that use the budget: all but those replaced by a retry and surplus ones."""
        return counted_trials(self.study.get_trials(deepcopy=False))

    def ask(self) -> tuple[optuna.Trial, dict[str, Any], Path] | None:
        """The next trial, its parameters and run folder; None when the budget is spent."""
        recover_dead_workers(self.study, self.storage, self.retry)
        counted = self.counted()
        waiting = any(t.state == TrialState.WAITING for t in counted)
        if len(counted) >= self.budget and not waiting:
            return None
        trial = self.study.ask()
        self.study.sampler = self.sampler(trial.number)  # independent draws happen at suggest time
        before = [t for t in self.counted() if t.number < trial.number]
        if "retries" not in trial.user_attrs and len(before) >= self.budget:  # another worker took the last one
            trial.set_user_attr("surplus", True)
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        params = suggest(trial, self.knobs)
        folder = Path(trial.user_attrs.get("folder") or self.spec.out / "trials" / f"{trial.number:04d}")
        overrides = as_overrides(params)
        for key, value in {**worker_identity(), "folder": str(folder), "overrides": overrides}.items():
            trial.set_user_attr(key, value)
        return trial, params, folder

    def save_spec(self) -> None:
        self.spec.out.mkdir(parents=True, exist_ok=True)
        info = {
            **json.loads(json.dumps(asdict(self.spec), default=str)),
            "budget": self.budget,
            "rule": self.rule,
            "knobs": [asdict(k) for k in self.knobs],
            "steps": self.cfg.train.steps,
        }
        atomic_write_text(self.spec.out / "sweep.json", json.dumps(info, indent=1))


@contextmanager
def heartbeat(storage: BaseStorage, trial: optuna.Trial, every_s: int):
    """Beat for ``trial`` every ``every_s`` seconds while the block runs (PostgreSQL studies only)."""
    if not isinstance(storage, RDBStorage):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial._trial_id)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_worker(spec: SweepSpec, quiet: bool = True) -> int:
    """Run trials of ``spec``'s study until its budget is spent; returns how many this worker ran.

    Under ``torchrun`` every rank calls this: rank 0 asks the study and broadcasts the trial, all ranks train it,
    and rank 0 alone reports, decides pruning (``TrialReporter``) and tells the study.
    """
    from asg.tuning.trial import run_trial

    dist = Dist.from_env(load_checked_config(spec.recipe, list(spec.overrides)).train.device)
    study = Study(spec) if dist.is_main else None
    if study is not None:
        study.save_spec()
    ran = 0
    while True:
        job = study.ask() if study is not None else None
        message = dist.broadcast_object(None if job is None else (job[0].number, as_overrides(job[1]), str(job[2])))
        if message is None:
            return ran
        number, overrides, folder = message
        trial = job[0] if job is not None else None
        with heartbeat(study.storage, trial, spec.heartbeat_s) if study and trial else _nothing():
            outcome = run_trial(spec, overrides, Path(folder), trial, study.rule if study else "", dist, quiet)
        ran += 1
        if study is not None and trial is not None:
            state, value, note = outcome
            trial.set_user_attr("stopped", note)
            study.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
            print(f"asg sweep: {study.spec.name} trial {number}: {note}", file=sys.stderr, flush=True)


@contextmanager
def _nothing():
    yield


def open_study(spec: SweepSpec) -> Study:
    """The study of ``spec`` (created when new), for reading its trials."""
    return Study(spec)
