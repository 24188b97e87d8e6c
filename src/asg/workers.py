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

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_DATA: dict[str, Any] = {}  # per worker process: data bundles by their data config
_POOL: dict[int, _Pool] = {}  # the pool of worker_pool(jobs), by jobs


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


class _Worker:
    """One spawned process that runs the tasks sent over its pipe, one at a time, and sends each result back."""

    def __init__(self, threads: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, threads), name="asg-worker")
        self.process.start()
        child.close()
        self.task: int | None = None  # the index of the task it runs

    def stop(self, timeout: float = 5.0) -> None:
        """Ask it to end (it finishes the task it runs), then end it."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.conn.close()


def _serve(conn: Any, threads: int) -> None:
    """A worker's loop: ``(index, fn, args)`` in, ``(index, ok, result or error)`` out; None ends it."""
    _init_worker(threads)
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):  # the parent is gone, or Ctrl-C between tasks
            return
        if message is None:
            return
        index, fn, args = message
        try:
            reply = (index, True, fn(*args))
        except BaseException as exc:  # Ctrl-C inside a task too: reported, and this worker goes on
            reply = (index, False, _portable(exc))
        try:
            conn.send(reply)
        except Exception as exc:  # a result that does not pickle
            conn.send((index, False, RuntimeError(f"the task's result cannot be sent back: {exc}")))


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else an error of its message (an AsgError stays one, with one line)."""
    try:
        back = pickle.loads(pickle.dumps(exc))
        if isinstance(back, BaseException):
            return back
    except Exception:
        pass
    from asg.errors import AsgError

    if isinstance(exc, AsgError):
        return AsgError(str(exc))
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RuntimeError(f"{type(exc).__name__} in a worker process:\n{trace}")


def _death(exitcode: int | None) -> str:
    """Why a worker process ended without a result, in words."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = ": killed by hand, or by the system when out of memory" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit code {exitcode}"


def task_name(fn: Callable[..., Any], task: tuple[Any, ...], index: int) -> str:
    """What a task is called in messages: its first path argument (a run folder), else ``fn #index``."""
    path = next((a for a in task if isinstance(a, (Path, os.PathLike))), None)
    return str(path) if path is not None else f"{getattr(fn, '__name__', 'task')} #{index + 1}"


class _Pool:
    """``jobs`` worker processes. A worker that dies (kill -9, out of memory) costs its own task only: the pool
    replaces it and the other tasks run to the end; then one error names the task that died."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.workers: list[_Worker] = []

    def run(self, fn: Callable[..., T], tasks: Sequence[tuple[Any, ...]]) -> list[T]:
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        dead: dict[int, str] = {}
        queue = list(range(len(tasks)))
        queue.reverse()
        while True:
            while queue and not errors:  # the first error stops new tasks; the running ones finish
                idle = next((w for w in self.workers if w.task is None), None)
                if idle is None:
                    if len(self.workers) >= self.jobs:
                        break
                    idle = _Worker(self.threads)
                    self.workers.append(idle)
                index = queue.pop()
                idle.task = index
                idle.conn.send((index, fn, tasks[index]))
            busy = [w for w in self.workers if w.task is not None]
            if not busy:
                break
            multiprocessing.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                assert worker.task is not None
                index = worker.task
                if worker.conn.poll():
                    try:
                        _, ok, value = worker.conn.recv()
                    except (EOFError, OSError):
                        ok, value = None, None
                    if ok is not None:
                        worker.task = None
                        (results if ok else errors)[index] = value
                        continue
                elif worker.process.is_alive():
                    continue
                worker.process.join()
                dead[index] = _death(worker.process.exitcode)
                worker.conn.close()
                self.workers.remove(worker)  # a fresh one takes its place when a task needs it
        if errors:
            first = min(errors)
            for index, why in dead.items():
                print(
                    f"asg: error: the worker process running {task_name(fn, tasks[index], index)} died ({why})",
                    file=sys.stderr,
                )
            raise errors[first]
        if dead:
            from asg.errors import AsgError

            names = ", ".join(task_name(fn, tasks[i], i) for i in sorted(dead))
            whys = "; ".join(sorted(set(dead.values())))
            finished = len(results)
            raise AsgError(
                f"the worker process running {names} died ({whys}); the other {finished} task(s) finished; rerun "
                "the same command to complete it (what finished is kept and read back)"
            )
        return [results[i] for i in range(len(tasks))]

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []


@contextmanager
def worker_pool(jobs: int) -> Iterator[None]:
    """Keep one pool of ``jobs`` workers for every :func:`run_tasks` call in the block, so that the workers import
    torch and build each data bundle once rather than once per call."""
    if jobs <= 1 or jobs in _POOL:
        yield
        return
    _POOL[jobs] = _Pool(jobs)
    try:
        yield
    finally:
        _POOL.pop(jobs).close()


def run_tasks(fn: Callable[..., T], tasks: Sequence[tuple[Any, ...]], jobs: int) -> list[T]:
    """``[fn(*task) for task in tasks]``, in ``jobs`` worker processes when ``jobs > 1`` (``fn`` then must be a
    module-level function and its arguments picklable; the pool of an enclosing :func:`worker_pool` is used, else
    one for this call). Results in the order of ``tasks``; the first error is raised once the running tasks stop.
    A worker that dies (kill -9, out of memory) loses its own task only: the others run to the end, then an
    AsgError names the task (its first path argument, e.g. the run folder) and says to rerun."""
    if jobs <= 1 or len(tasks) <= 1:
        return [fn(*task) for task in tasks]
    pool = _POOL.get(jobs)
    if pool is not None:
        return pool.run(fn, tasks)
    own = _Pool(min(jobs, len(tasks)))
    try:
        return own.run(fn, tasks)
    finally:
        own.close()
