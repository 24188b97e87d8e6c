"""``asg compare RUN...``: one table of several finished runs, read from each run folder's ``summary.json`` and
``config.yaml`` alone (no data, no model).

One row per run: method, backbone learning-rate multiplier (``optim.backbone_lr_mult``), head learning rate
(``optim.lr``), steps, seed, then for each real evaluation set the primary metric (``summary.json``'s
``primary_metric``, in %) of the three checkpoint selections: ``last`` (the last step), ``sv`` (chosen on the
held-out synthetic source-val set: the valid protocol) and ``oracle`` (chosen with the real labels: an upper bound).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from asg.engine.rundir.folder import RunDir
from asg.errors import AsgError

SELECTIONS = (("last", "last"), ("source-val", "sv"), ("oracle", "oracle"))  # summary key, column label


@dataclass
class RunRow:
    """One run's line of the table; ``scores[set][selection]`` is the primary metric (a fraction) or None."""

    run: str
    method: str
    backbone_lr_mult: float
    lr: float
    steps: int
    seed: int
    metric: str
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)


def read_run(path: str | Path) -> RunRow:
    """The table row of the finished run folder ``path``; AsgError (one line) when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise AsgError(f"{path} is not a run folder (it does not exist or is a file)")
    rd = RunDir(path)
    if not rd.config_path.is_file():
        raise AsgError(f"{path} is not a run folder: it has no config.yaml (pass the --out folder of `asg train`)")
    summary = rd.read_summary()
    if not rd.is_done() or summary is None:
        raise AsgError(
            f"{path} is not a finished run (no 'done' file or summary.json): let it finish, or continue "
            f"it with `asg train --resume --out {path}`"
        )
    cfg = rd.read_config()
    metric = summary.primary_metric
    source_val = summary.source_val_set or "source_val"
    scores: dict[str, dict[str, float | None]] = {}
    for key, _label in SELECTIONS:
        sel = summary.selections.get(key)
        if sel is None:
            continue
        for set_name, values in sel.metrics.items():
            if set_name != source_val and isinstance(values, dict):
                scores.setdefault(set_name, {})[key] = sel.report.value(set_name, metric)
    return RunRow(
        run=str(path),
        method=summary.method or cfg.method.name,
        backbone_lr_mult=float(cfg.optim.backbone_lr_mult),
        lr=float(cfg.optim.lr),
        steps=summary.steps or cfg.train.steps,
        seed=summary.seed,
        metric=metric,
        scores=scores,
    )


def compare_runs(paths: list[str | Path]) -> list[RunRow]:
    """The rows of ``paths`` in the order given; AsgError for the first folder that is not a finished run."""
    if not paths:
        raise AsgError("asg compare needs at least one run folder")
    rows = [read_run(p) for p in paths]
    names = short_names([Path(p) for p in paths])
    for row, name in zip(rows, names):
        row.run = name
    return rows


def short_names(paths: list[Path]) -> list[str]:
    """Each path relative to the folder that holds them all (``runs/a/x``, ``runs/b/x`` -> ``a/x``, ``b/x``)."""
    resolved = [p.resolve() for p in paths]
    try:
        common = Path(os.path.commonpath([p.parent for p in resolved]))
    except ValueError:  # different drives
        return [str(p) for p in paths]
    return [str(p.relative_to(common)) for p in resolved]


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def table(rows: list[RunRow], markdown: bool = False) -> str:
    """``rows`` as an aligned text table (or a Markdown table) with a legend line under it."""
    sets: list[str] = []
    for row in rows:
        sets += [s for s in row.scores if s not in sets]
    header = ["run", "method", "bb_lr_mult", "lr", "steps", "seed", "metric"]
    header += [f"{s} {label}" for s in sets for _key, label in SELECTIONS]
    body = [
        [row.run, row.method, f"{row.backbone_lr_mult:.3g}", f"{row.lr:.3g}", str(row.steps), str(row.seed), row.metric]
        + [_cell(row.scores.get(s, {}).get(key)) for s in sets for key, _label in SELECTIONS]
        for row in rows
    ]
    legend = (
        "metric in %: last = the last step; sv = the step chosen on synthetic source-val (the valid protocol); "
        "oracle = chosen with the real labels (an upper bound); bb_lr_mult = optim.backbone_lr_mult"
    )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines) + "\n\n" + legend
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    numeric = set(range(2, len(header))) - {6}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)]
    return "\n".join(s.rstrip() for s in lines) + "\n" + legend
