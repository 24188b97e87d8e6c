"""The adaptation report: metric per round, pseudo-label precision per round (computed here, after the
rounds, from the benchmark's labelled view of the target set when it has one), thresholds and class counts.

It takes what it shows as arguments and writes only ``report.md`` and ``adaptation.png``; ``adaptation.json``
has one writer, :class:`asg.adapt.rounds.Adaptation`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from asg.adapt.pseudo import load_pseudo_labels
from asg.engine.evaluation.report import plot_curves
from asg.engine.rundir.folder import RunDir
from asg.io import atomic_write


@dataclass
class AdaptResult:
    """What ``asg adapt`` returns: the folder, the starting model's evaluation and one row per round."""

    out_dir: Path
    start: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    target: str = ""
    primary_metric: str = ""


def pseudo_precision(truth: Any, folder: Path, num_classes: int) -> dict[str, Any] | None:
    """Precision of a round's pseudo-labels against the true labels of the target items: overall and per
    class (of the pseudo-labelled class); pixels for segmentation (items resized to the pseudo-label map)."""
    pseudo = load_pseudo_labels(folder)
    if pseudo is None:
        return None
    right = np.zeros(num_classes, dtype=np.int64)
    total = np.zeros(num_classes, dtype=np.int64)
    if pseudo.labels is not None:
        true = np.asarray(truth.labels, dtype=np.int64)[pseudo.indices]
        np.add.at(total, pseudo.labels, 1)
        np.add.at(right, pseudo.labels[true == pseudo.labels], 1)
    else:
        for j, i in enumerate(pseudo.indices):
            label = pseudo.label(j)
            item = truth[int(i)]
            if item is None:
                continue
            mask = torch.as_tensor(item[1])
            if tuple(mask.shape) != tuple(label.shape):
                mask = F.interpolate(mask[None, None].float(), size=tuple(label.shape), mode="nearest")[0, 0].long()
            kept = (label != 255) & (mask != 255)
            total += np.bincount(label[kept].numpy(), minlength=num_classes)[:num_classes]
            hit = kept & (label == mask)
            right += np.bincount(label[hit].numpy(), minlength=num_classes)[:num_classes]
    per_class = [float(r / t) if t else None for r, t in zip(right, total)]
    return {"precision": float(right.sum() / max(total.sum(), 1)), "per_class": per_class}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def report_markdown(result: AdaptResult, class_names: list[str], sets: list[str], note: str | None) -> str:
    metric = result.primary_metric
    lines = [
        f"# Adaptation of {result.start.get('init_from')}",
        "",
        f"Target: **{result.target}** (unlabelled; its labels are never read during adaptation). Test sets: "
        f"{', '.join(sets)} ({metric}, %, last weights of each round). Pseudo-label precision is computed after "
        "the rounds, for this report only.",
    ]
    init = result.start.get("init_weights")
    if init:
        finished = {True: "a finished run", False: "a run that never finished", None: "a weights file"}
        lines += [
            "",
            f"Starting weights: {init['file']} (step {init['step']}, {finished[init['finished']]}; "
            f"SHA-256 {init['sha256']}).",
        ]
    if note:
        lines += ["", f"Note: {note}."]
    head = "| round | portion | selected | pseudo-label precision % | " + " | ".join(sets) + " |"
    lines += ["", head, "|" + "---|" * (4 + len(sets))]
    start = result.start["metrics"]
    lines.append("| start | – | – | – | " + " | ".join(_pct(start.get(s, {}).get(metric)) for s in sets) + " |")
    for row in result.rounds:
        p = row["pseudo"]
        prec = row.get("precision", {}) or {}
        sel = f"{p['selected']:,} / {p['total']:,} {p['unit']}"
        vals = " | ".join(_pct(row["metrics"].get(s, {}).get(metric)) for s in sets)
        lines.append(f"| {row['round']} | {row['portion']:.2f} | {sel} | {_pct(prec.get('precision'))} | {vals} |")
    lines += ["", "Per-class thresholds (confidence) and pseudo-label counts per round:", ""]
    lines += ["| class | " + " | ".join(f"round {r['round']}" for r in result.rounds) + " |"]
    lines += ["|---|" + "---|" * len(result.rounds)]
    for c, name in enumerate(class_names):
        cells = []
        for r in result.rounds:
            t = r["thresholds"][c]
            cells.append(f"{'–' if t is None else f'{t:.3f}'} / {r['pseudo']['class_counts'][c]:,}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_precision(rounds: list[dict[str, Any]], out_dir: Path, truth: Any, num_classes: int) -> None:
    """Add each round's pseudo-label precision (``row["precision"]``) against ``truth``, the labelled view of
    the target set."""
    for row in rounds:
        row["precision"] = pseudo_precision(truth, out_dir / row["folder"], num_classes)


def write_report(
    run_dir: RunDir, result: AdaptResult, class_names: list[str], sets: list[str], note: str | None
) -> None:
    """Write ``report.md`` and ``adaptation.png`` (metric per round on ``sets``, pseudo-label precision when the
    rounds have it) into the adaptation folder ``run_dir``; ``note`` is printed above the table."""
    run_dir.write_text("report.md", report_markdown(result, class_names, sets, note))
    metric = result.primary_metric
    curves: dict[str, list[tuple[int, float]]] = {}
    for s in sets:
        curves[s] = [(0, result.start["metrics"][s][metric])] + [
            (r["round"], r["metrics"][s][metric]) for r in result.rounds if s in r["metrics"]
        ]
    precision = [(r["round"], r["precision"]["precision"]) for r in result.rounds if r.get("precision")]
    if precision:
        curves["pseudo-label precision"] = precision
    path = result.out_dir / "adaptation.png"
    atomic_write(
        path, lambda tmp: plot_curves(curves, Path(tmp), f"adaptation to {result.target}", metric, "round (0 = start)")
    )
