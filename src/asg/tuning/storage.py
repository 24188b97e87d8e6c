"""Where a study lives, and what happens to the trials of a worker that died.

- default: Optuna's journal file in the sweep folder (several processes on one machine, through file locks);
- ``postgresql://...``: one study joined by workers on many machines (RDBStorage with heartbeats);
- SQLite is refused: with parallel workers it raises "database is locked" and loses trials.

A trial records its worker's host and PID. A worker that finds a RUNNING trial of a dead process on its own host
(kill -9, a crash), or, on PostgreSQL, one whose heartbeat stopped, marks it failed and retries it as a waiting
trial with the same parameters and run folder (so the retry resumes the run's last checkpoint), up to
``max_retries`` times; it prints one line saying which.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from asg.errors import ConfigError

JOURNAL = "optuna.journal"


def make_storage(
    url: str | None, folder: Path, heartbeat_s: int = 60, grace_s: int = 180, max_retries: int = 2
) -> BaseStorage:
    """The storage named by ``url`` (None: the journal file ``folder/optuna.journal``)."""
    if url is None or url.startswith("journal:") or url.endswith(".journal"):
        path = Path(url.removeprefix("journal:")) if url else folder / JOURNAL
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite"):
        raise ConfigError(
            "--storage sqlite:// is refused: with parallel workers SQLite locks and loses trials; use "
            "the journal file (the default) or postgresql://USER@HOST/DB"
        )
    if not url.startswith(("postgresql", "mysql")):
        raise ConfigError(f"--storage {url!r}: give postgresql://USER@HOST[:PORT]/DB or a .journal file")
    if url.startswith("postgresql://") and _has("psycopg") and not _has("psycopg2"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")  # the driver installed with asg
    for attempt in range(3):  # workers starting together race to create the tables: the losers try again
        try:
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                heartbeat_stale_trial_callback=RetryDeadWorker(max_retries),
            )
        except Exception as exc:  # sqlalchemy's connection and driver errors
            if attempt == 2:
                raise ConfigError(f"cannot open the study storage {_safe(url)}: {str(exc).splitlines()[0]}") from None
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _safe(url: str) -> str:
    """The URL without its password."""
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, user = head.partition("//")
    return f"{scheme}//{user.split(':', 1)[0]}:***@{tail}"


def worker_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RetryDeadWorker:
    """Retry a trial whose worker died: a waiting trial with the same parameters and user attributes (its run
    folder among them), ``retries`` listing the trials it replaces; after ``max_retries`` it stays failed."""

    def __init__(self, max_retries: int = 2) -> None:
        self.max_retries = max_retries

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        chain = [*trial.user_attrs.get("retries", []), trial.number]
        who = f"pid {trial.user_attrs.get('pid')} on {trial.user_attrs.get('host')}"
        if len(chain) > self.max_retries:
            print(
                f"asg sweep: trial {trial.number} of {study.study_name}: its worker ({who}) stopped mid-trial; "
                f"already retried {self.max_retries} times, so it stays failed",
                file=sys.stderr,
            )
            return
        attrs = {**trial.user_attrs, "retries": chain}
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING, params=trial.params, distributions=trial.distributions, user_attrs=attrs
            )
        )
        print(
            f"asg sweep: trial {trial.number} of {study.study_name}: its worker ({who}) stopped mid-trial; marked "
            f"failed and retried with the same parameters, resuming {trial.user_attrs.get('folder')}",
            file=sys.stderr,
        )


def counted_trials(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that use a study's budget: all but those replaced by a retry (a chain of retries counts once)
    and surplus ones (a worker's ask after the budget was spent)."""
    replaced = {n for t in trials for n in t.user_attrs.get("retries", [])}
    return [t for t in trials if t.number not in replaced and not t.user_attrs.get("surplus")]


def recover_dead_workers(study: optuna.Study, storage: BaseStorage, retry: RetryDeadWorker) -> list[int]:
    """Fail and retry the RUNNING trials of dead processes on this host (and, on PostgreSQL, those whose heartbeat
    stopped). Returns the numbers of the trials failed here."""
    failed = []
    here = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != here or not isinstance(pid, int) or _alive(pid):
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                continue
        except RuntimeError:  # another worker failed it first (UpdateFinishedTrialError)
            continue
        retry(study, t)
        failed.append(t.number)
    if isinstance(storage, RDBStorage):  # heartbeats: workers on other machines too
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        optuna.storages.fail_stale_trials(study)  # calls RetryDeadWorker on each
        failed += sorted({t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before)
    return failed
