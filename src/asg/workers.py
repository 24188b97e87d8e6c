"""Independent runs of a sweep (the demo's grid points, seeds and adaptations) in parallel worker processes.

On a CPU the small networks of the embedded benchmarks do not keep two threads busy: two single-threaded runs
side by side finished 1.5x sooner than the same two runs one after the other with two threads each (2 cores,
digit scenes at 64 px, 60 steps: 30.1 s against 2 x 22.6 s, start-up and evaluation included). ``jobs`` worker
processes (started with ``spawn``) each run one task at a time with
``threads`` intra-op threads. Every run seeds itself and writes its own folder, so a task gives the same result
whichever worker runs it (up to float rounding: the thread count can change the order of a reduction), and an
interrupted sweep continues from the finished folders. ``jobs=1`` runs the tasks here, in order.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_DATA: dict[str, Any] = {}  # per worker process: data bundles by their data config
_POOL: dict[int, ProcessPoolExecutor] = {}  # the pool of worker_pool(jobs), by jobs


def default_jobs(device: str = "auto") -> int:
    """Worker processes for a sweep: one per CPU core (at most 4: each holds a copy of the data and the model)
    when training on the CPU; 1 when a GPU trains (its runs would queue on the one device)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def shared_data(data_cfg: Any) -> Any:
    """The data bundle of ``data_cfg`` (an ``asg.config.DataConfig``), built once per process."""
    from asg.data import build_data

    key = repr(data_cfg)
    if key not in _DATA:
        _DATA[key] = build_data(data_cfg)
    return _DATA[key]


def _new_pool(jobs: int) -> ProcessPoolExecutor:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), _init_worker, (threads,))


@contextmanager
def worker_pool(jobs: int) -> Iterator[None]:
    """Keep one pool of ``jobs`` workers for every :func:`run_tasks` call in the block, so that the workers import
    torch and build each data bundle once rather than once per call."""
    if jobs <= 1 or jobs in _POOL:
        yield
        return
    _POOL[jobs] = _new_pool(jobs)
    try:
        yield
    finally:
        _POOL.pop(jobs).shutdown(cancel_futures=True)


def run_tasks(fn: Callable[..., T], tasks: Sequence[tuple[Any, ...]], jobs: int) -> list[T]:
    """``[fn(*task) for task in tasks]``, in ``jobs`` worker processes when ``jobs > 1`` (``fn`` then must be a
    module-level function and its arguments picklable; the pool of an enclosing :func:`worker_pool` is used, else
    one for this call). Results in the order of ``tasks``; the first error is raised once the running tasks stop."""
    if jobs <= 1 or len(tasks) <= 1:
        return [fn(*task) for task in tasks]
    pool = _POOL.get(jobs)
    if pool is None:
        with _new_pool(min(jobs, len(tasks))) as own:
            return _collect(own, fn, tasks)
    return _collect(pool, fn, tasks)


def _collect(pool: ProcessPoolExecutor, fn: Callable[..., T], tasks: Sequence[tuple[Any, ...]]) -> list[T]:
    futures = [pool.submit(fn, *task) for task in tasks]
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        raise
