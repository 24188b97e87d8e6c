"""Running a study: ``jobs`` local worker processes (``run_workers``) and the ``asg.sweep`` API (``sweep``)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

from asg.tuning.results import summary
from asg.tuning.spec import SweepSpec
from asg.tuning.study import Study, run_worker


def _worker_main(spec: SweepSpec, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    run_worker(spec)


def run_workers(spec: SweepSpec, jobs: int = 1, threads: int | None = None) -> list[str]:
    """Run ``jobs`` workers of ``spec``'s study on this machine until its budget is spent (``jobs`` 1: here).

    ``threads``: torch threads per worker process (default: the CPU cores shared out). A trial's scores on the CPU
    depend on it (the order of floating-point sums), and so may the pruner's decisions.

    A worker that dies (kill -9, out of memory) is one line naming it; the others go on, and the next worker to
    ask for a trial retries the dead one's trial. Returns those lines."""
    Study(spec).save_spec()  # create the study once, before several processes race to
    if jobs <= 1:
        run_worker(spec, quiet=False)
        return []
    ctx = multiprocessing.get_context("spawn")
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    procs = [ctx.Process(target=_worker_main, args=(spec, threads), name=f"worker{i}") for i in range(jobs)]
    for p in procs:
        p.start()
    lost = []
    for p in procs:
        p.join()
        if p.exitcode:
            lost.append(f"asg sweep: {spec.name} {p.name} (pid {p.pid}) stopped with exit code {p.exitcode}")
            print(lost[-1], file=sys.stderr, flush=True)
    if lost:  # finish what the dead workers left: their trials are retried here
        run_worker(spec, quiet=True)
    return lost


def sweep(
    recipe: str,
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    trials: int = 8,
    sampler: str = "tpe",
    seed: int = 0,
    pruner: str = "asha",
    storage: str | None = None,
    jobs: int = 1,
    threads: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Tune ``recipe``'s method: ``trials`` trials of its search space (``asg.methods.space``) at the length of
    ``overrides``, chosen on the last source-val score. Returns the trials, the best one and the cost.

    ``threads``: torch threads per worker process when ``jobs`` > 1 (:func:`run_workers`).
    ``options``: the other fields of :class:`SweepSpec` (study_name, ranges, min_resource, reduction_factor, ...).
    """
    spec = SweepSpec(recipe, Path(out), list(overrides), trials, sampler, seed, pruner, storage=storage, **options)
    t0 = time.time()
    lost = run_workers(spec, jobs, threads)
    result = summary(Study(spec))
    result["cost"]["wall_s"] = round(time.time() - t0, 1)
    result["lost_workers"] = lost
    return result
