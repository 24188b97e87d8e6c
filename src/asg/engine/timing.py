"""Where a run's wall time goes: seconds per phase of the trainer, written to ``summary.json`` and ``report.md``.

Phases: ``setup`` (from the trainer's construction to its first batch: model, teacher, teacher cache, run folder,
resume), ``data`` (waiting for the next batch from the DataLoader), ``train_step`` (``Trainer.train_step``:
teacher, forward, loss, backward, gradient all-reduce, clipping, optimizer, controller), ``checkpoint``,
``eval`` (evaluations during training) and ``final`` (selections, retention, report, figures). Each step ends
with the loss read on the host, so on a GPU the step time includes its kernels.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

PHASES = ("setup", "data", "train_step", "checkpoint", "eval", "final")


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory (MiB, Linux/macOS) and, on CUDA, the peak allocated on ``device``."""
    out: dict[str, float] = {}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mib"] = round(rss / (2**20 if sys.platform == "darwin" else 1024), 1)  # bytes / KiB
    except ImportError:  # Windows
        pass
    if device.type == "cuda":
        out["peak_cuda_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


class PhaseTimer:
    """Sums wall seconds per phase; the clock starts at construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Add the block's wall time to ``phase`` (phases are not nested)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t

    def mark_setup_done(self) -> None:
        """Everything from construction until now (not already in another phase) is ``setup``."""
        others = sum(v for k, v in self.seconds.items() if k != "setup")
        self.seconds["setup"] = time.perf_counter() - self.start - others

    def summary(self, steps: int) -> dict[str, Any]:
        """``{phase}_s`` for every phase, ``other_s`` (logging, the progress bar...), ``wall_s``, ``steps`` taken in
        this process, ``train_step_fraction`` of the wall time and ``steps_per_s`` over the training loop
        (data + train_step + checkpoint + eval: the loop's own rate, set-up and the end excluded)."""
        wall = time.perf_counter() - self.start
        out: dict[str, Any] = {f"{k}_s": round(v, 3) for k, v in self.seconds.items()}
        out["other_s"] = round(max(wall - sum(self.seconds.values()), 0.0), 3)
        out["wall_s"] = round(wall, 3)
        out["steps"] = steps
        out["train_step_fraction"] = round(self.seconds["train_step"] / wall, 4) if wall > 0 else None
        loop = sum(self.seconds[k] for k in ("data", "train_step", "checkpoint", "eval"))
        out["steps_per_s"] = round(steps / loop, 4) if steps and loop > 0 else None
        return out


def timing_markdown(timing: dict[str, Any]) -> list[str]:
    """Lines of report.md: one sentence and a table of seconds and shares per phase."""
    wall = timing.get("wall_s") or 0.0
    if not wall:
        return []
    lines = [
        "## Where the time went",
        "",
        f"{timing.get('steps', 0)} steps in {wall:.1f} s of wall time in this process; training steps "
        f"{100 * (timing.get('train_step_fraction') or 0.0):.1f} % of it.",
        "",
        "| phase | seconds | share |",
        "|---|---|---|",
    ]
    for phase in (*PHASES, "other"):
        s = timing.get(f"{phase}_s", 0.0)
        lines.append(f"| {phase} | {s:.1f} | {100 * s / wall:.1f} % |")
    return [*lines, ""]
