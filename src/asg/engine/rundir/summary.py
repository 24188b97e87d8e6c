"""The typed records of a run's results: :class:`EvalReport` (an evaluation's metrics per set and their average
over the real sets) and :class:`RunSummary` (a finished run's ``summary.json``, read back by
:meth:`asg.engine.rundir.folder.RunDir.read_summary`).

``summary.json`` carries ``version`` (:data:`SUMMARY_VERSION`); a file without it was written before the field
existed (version 0) and reads alike, its missing fields taking the values the writer of that time implied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asg.tasks import CLASSIFICATION, get_task


def real_average(metrics: dict[str, dict[str, Any]], real_sets: list[str], metric: str) -> dict[str, Any] | None:
    """Mean of ``metric`` over the real sets present (at least two), labelled with what it averages.

    ``metrics`` maps set names to ``EvalResult.to_dict()``; returns e.g.
    ``{"metric": metric, "value": 0.41, "over": ["cityscapes", "bdd100k", "mapillary"], ...}``.
    """
    names = [n for n in real_sets if n in metrics]
    if len(names) < 2:
        return None
    values = [metrics[n][metric] for n in names]
    return {"metric": metric, "value": float(np.mean(values)), "over": names, "note": "unweighted mean over the sets"}


SUMMARY_VERSION = 1  # 1: ``version`` written; 0: a file without it (same fields, some absent in older files)


@dataclass
class EvalReport:
    """One evaluation: ``metrics`` (set name -> ``EvalResult.to_dict()``, plus ``real_photos`` retention where
    measured) and ``real_average``, the labelled mean of the primary metric over the real sets (None with fewer
    than two)."""

    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    real_average: dict[str, Any] | None = None

    @classmethod
    def of(cls, metrics: dict[str, dict[str, Any]], real_sets: list[str], metric: str) -> EvalReport:
        """``metrics`` with the average of ``metric`` over the ``real_sets`` present."""
        return cls(metrics, real_average(metrics, real_sets, metric))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        return cls(dict(d.get("metrics") or {}), d.get("real_average"))

    def to_dict(self) -> dict[str, Any]:
        """``{"metrics": ..., "real_average": ...}`` (the average only when there is one)."""
        out: dict[str, Any] = {"metrics": self.metrics}
        if self.real_average is not None:
            out["real_average"] = self.real_average
        return out

    def value(self, set_name: str, metric: str) -> float | None:
        """``metric`` on ``set_name`` (None when that set or metric was not evaluated)."""
        v = self.metrics.get(set_name, {}).get(metric)
        return float(v) if isinstance(v, (int, float)) else None


@dataclass
class Selection:
    """The weights one checkpoint rule selected (``last``, ``source-val``, ``oracle``) and their final numbers.

    ``extra``: the other fields, in the file's order (``selected_on``, ``note``, ``eval_max_per_set``,
    ``confusion``, the protocol fields)."""

    step: int
    checkpoint: str
    report: EvalReport = field(default_factory=EvalReport)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        return self.report.metrics

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Selection:
        rest = {k: v for k, v in d.items() if k not in ("step", "checkpoint", "metrics", "real_average")}
        return cls(int(d["step"]), str(d.get("checkpoint", "")), EvalReport.from_dict(d), rest)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "checkpoint": self.checkpoint, **self.extra, **self.report.to_dict()}


@dataclass
class RunSummary:
    """A finished run's ``summary.json``: what ran, each rule's selection, the protocol and the run's facts."""

    name: str | None
    method: str
    seed: int
    steps: int
    selections: dict[str, Selection]
    task: str = CLASSIFICATION.name
    primary_metric: str = ""  # "" when read: the task's
    class_names: list[str] = field(default_factory=list)
    controller_history: list[dict[str, Any]] = field(default_factory=list)
    group_names: list[str] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)
    teacher_cache: Any = None
    source_val_set: str | None = None
    init_from: str | None = None
    on_bad_image: str = "error"
    skipped_images: list[str] = field(default_factory=list)
    world_size: int = 1
    figures: list[str] = field(default_factory=list)
    timing: dict[str, Any] | None = None
    version: int = SUMMARY_VERSION

    def __post_init__(self) -> None:
        if not self.primary_metric:
            self.primary_metric = get_task(self.task).primary_metric

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSummary:
        """A summary read from JSON; a file without ``version`` (version 0) reads alike."""
        sels = {rule: Selection.from_dict(s) for rule, s in (d.get("selections") or {}).items()}
        return cls(
            name=d.get("name"),
            method=str(d.get("method", "")),
            seed=int(d.get("seed", 0)),
            steps=int(d.get("steps", 0)),
            selections=sels,
            task=str(d.get("task") or CLASSIFICATION.name),
            primary_metric=str(d.get("primary_metric") or ""),
            class_names=list(d.get("class_names") or []),
            controller_history=list(d.get("controller_history") or []),
            group_names=list(d.get("group_names") or []),
            protocol=dict(d.get("protocol") or {}),
            teacher_cache=d.get("teacher_cache"),
            source_val_set=d.get("source_val_set"),
            init_from=d.get("init_from"),
            on_bad_image=str(d.get("on_bad_image") or "error"),
            skipped_images=list(d.get("skipped_images") or []),
            world_size=int(d.get("world_size", 1)),
            figures=list(d.get("figures") or []),
            timing=d.get("timing"),
            version=int(d.get("version", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``summary.json`` (``timing`` only when measured)."""
        out = {
            "version": self.version,
            "name": self.name,
            "method": self.method,
            "seed": self.seed,
            "steps": self.steps,
            "selections": {rule: s.to_dict() for rule, s in self.selections.items()},
            "controller_history": self.controller_history,
            "group_names": self.group_names,
            "class_names": self.class_names,
            "task": self.task,
            "primary_metric": self.primary_metric,
            "protocol": self.protocol,
            "teacher_cache": self.teacher_cache,
            "source_val_set": self.source_val_set,
            "init_from": self.init_from,
            "on_bad_image": self.on_bad_image,
            "skipped_images": self.skipped_images,
            "world_size": self.world_size,
            "figures": self.figures,
        }
        if self.timing is not None:
            out["timing"] = self.timing
        return out
