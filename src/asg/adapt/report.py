"""The adaptation report: metric per round, pseudo-label precision per round (computed here, after the
rounds, from the benchmark's labelled view of the target set when it has one), thresholds and class counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

from asg.adapt.pseudo import load_pseudo_labels
from asg.engine.report import plot_curves
from asg.io import atomic_write

if TYPE_CHECKING:
    from asg.adapt.rounds import Adaptation, AdaptResult


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
        lines += ["", f"Starting weights: {init['file']} (step {init['step']}, {finished[init['finished']]}; "
                  f"SHA-256 {init['sha256']})."]  # fmt: skip
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


def write_report(adaptation: Adaptation, result: AdaptResult) -> None:
    """Add pseudo-label precision to each round (when the benchmark has labels for the target), then write
    ``report.md`` and ``adaptation.png`` into the adaptation folder."""
    data = adaptation.data
    truth = data.target_truth.get(result.target)
    for row in result.rounds:
        if truth is not None:
            row["precision"] = pseudo_precision(truth, result.out_dir / row["folder"], data.num_classes)
    sets = data.real_set_names
    note = adaptation.target_note
    if truth is None:
        extra = "pseudo-label precision is not available: the benchmark has no labelled view of this target"
        note = f"{note}; {extra}" if note else extra
    text = report_markdown(result, data.class_names, sets, note)
    adaptation.rd.write_text("report.md", text)
    adaptation.rd.write_text(
        "adaptation.json",
        json.dumps({"target": result.target, "start": result.start, "rounds": result.rounds}, indent=1),
    )
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
