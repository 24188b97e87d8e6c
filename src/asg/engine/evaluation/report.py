"""Plots and human-readable reports (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from asg.engine.rundir.summary import RunSummary  # noqa: E402
from asg.engine.timing import timing_markdown  # noqa: E402
from asg.tasks import get_task  # noqa: E402


def plot_confusion(confusion, class_names: list[str], path: Path, title: str = "") -> None:
    """Row-normalised confusion matrix (rows: true class) with per-cell percentages."""
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(0.5 * n + 2.5, 0.5 * n + 2))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{100 * norm[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plot_curves(
    curves: dict[str, list[tuple[int, float]]], path: Path, title: str, ylabel: str, xlabel: str = "training step"
) -> None:
    """One line per label: ``curves[label] = [(step, value), ...]``; values in [0, 1] shown in %."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, [100 * v for v in values], marker="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plot_per_class(per_class: dict[str, list[float]], class_names: list[str], path: Path, title: str) -> None:
    """Grouped bars: per-class accuracy of each method (``per_class[label]`` has one value per class)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(class_names) * max(1, len(per_class)) / 2), 4))
    width = 0.8 / max(len(per_class), 1)
    x = np.arange(len(class_names))
    for k, (label, values) in enumerate(per_class.items()):
        ax.bar(x + k * width - 0.4 + width / 2, [100 * (v or 0) for v in values], width, label=label)
    ax.set_xticks(x, class_names)
    ax.set_ylabel("per-class accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def colorize(labels: np.ndarray, palette: list[tuple[int, int, int]], ignore_index: int = 255) -> np.ndarray:
    """Class-id map [H, W] -> RGB uint8 [H, W, 3]; ``ignore_index`` pixels are white."""
    lut = np.full((256, 3), 255, dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    lut[ignore_index] = 255
    return lut[np.clip(labels, 0, 255).astype(np.int64)]


def legend_entries(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    palette: list[tuple[int, int, int]],
    class_names: list[str] | None = None,
    ignore_index: int = 255,
) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of every class in the samples' labels or predictions, then white for ``ignore_index``
    (pixels the label leaves unscored, e.g. the rims around the digit scenes' strokes) if any label has it."""
    ids = sorted(
        {int(c) for _, label, pred in samples for c in np.unique(np.concatenate([label.ravel(), pred.ravel()]))}
    )
    entries = [(class_names[c] if class_names else str(c), palette[c]) for c in ids if c < len(palette)]
    if ignore_index in ids:
        entries.append((f"ignored ({ignore_index}): not scored", (255, 255, 255)))
    return entries


def plot_predictions(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    palette: list[tuple[int, int, int]],
    path: Path,
    title: str,
    class_names: list[str] | None = None,
    ignore_index: int = 255,
) -> None:
    """Rows of (image [H,W,3] in [0,1], label [H,W], prediction [H,W]), labels colour-coded with ``palette``; below
    them a legend of the classes shown (name and colour) and of white, the pixels the label ignores (not scored)."""
    fig, axes = plt.subplots(len(samples), 3, figsize=(7.5, 2.4 * len(samples) + 0.6), squeeze=False)
    titles = ("image", "label", "prediction")
    for row, (image, label, pred) in zip(axes, samples):
        for ax, shown, name in zip(row, (image, colorize(label, palette), colorize(pred, palette)), titles):
            ax.imshow(shown)
            ax.set_title(name, fontsize=8)
            ax.axis("off")
    entries = legend_entries(samples, palette, class_names, ignore_index)
    handles = [
        Patch(facecolor=(rgb[0] / 255, rgb[1] / 255, rgb[2] / 255), edgecolor="0.5", label=name)
        for name, rgb in entries
    ]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.6 / (2.4 * len(samples) + 0.6), 1, 1))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def run_report_markdown(summary: RunSummary, history: list[dict]) -> str:
    """A run's ``report.md``: the protocol, each selection's primary metric per set, per-class tables."""
    task, metric = summary.task, summary.primary_metric
    lines = [f"# {summary.name or 'run'}: {summary.method} (seed {summary.seed})", ""]
    protocol = ", ".join(f"{k}={v}" for k, v in summary.protocol.items())
    lines += [f"Task: {task}; primary metric: {metric}; protocol: {protocol}.", ""]
    selections = summary.selections
    sets = sorted({s for sel in selections.values() for s in sel.metrics if s != "real_photos"})
    if sets:
        lines += ["| checkpoint | step | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets)]
        for rule, sel in selections.items():
            m = sel.metrics
            cells = [_pct(m[s].get(metric)) if s in m else "" for s in sets]
            lines.append(f"| {rule} | {sel.step} | " + " | ".join(cells) + " |")
        lines.append("")
        averages = {r: s.report.real_average for r, s in selections.items() if s.report.real_average is not None}
        for rule, avg in averages.items():
            lines.append(f"- {rule}: {avg['metric']} averaged over {', '.join(avg['over'])} = {_pct(avg['value'])}")
        for sel in selections.values():
            if sel.extra.get("note"):
                lines.append(f"- {sel.extra['note']}")
        lines.append("")
        lines += _group_means_table(summary, sets)
    last = selections["last"].metrics if "last" in selections else {}
    per_class_key, what = get_task(task).per_class, get_task(task).per_class_label
    names = summary.class_names
    shown = [s for s in sets if per_class_key in last.get(s, {})]
    if shown and names:
        lines += [f"## Per-class {what} (%), last checkpoint", ""]
        lines += ["| class | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
        for c, name in enumerate(names):
            lines.append(f"| {name} | " + " | ".join(_pct(last[s][per_class_key][c]) for s in shown) + " |")
        lines.append("")
    retention = last.get("real_photos")
    if retention:
        lines += [
            f"ImageNet retention (last): top-1 agreement {_pct(retention['top1_agreement'])} %, "
            f"KL {retention['kl']:.3f}.",
            "",
        ]
    figures = [("curves.png", "Curves"), ("predictions.png", "Predictions (last checkpoint)")]
    lines += [f"![{title}]({name})" for name, title in figures if name in summary.figures]
    if summary.timing:
        lines += ["", *timing_markdown(summary.timing)]
    lines.append(f"\n{len(history)} evaluations in results.jsonl.")
    return "\n".join(lines) + "\n"


def _group_means_table(summary: RunSummary, sets: list[str]) -> list[str]:
    """Lines of report.md: each selection's mean per-class metric of every class group (``DataBundle.class_groups``,
    e.g. the digit scenes' mean digit IoU) per set; none when the data declares no group."""
    selections = summary.selections
    groups = list(
        dict.fromkeys(g for sel in selections.values() for m in sel.metrics.values() for g in m.get("group_means", {}))
    )
    if not groups:
        return []
    what = get_task(summary.task).per_class_label
    columns = [(s, g) for s in sets for g in groups]
    lines = [f"Mean {what} (%) of each class group:", ""]
    lines += ["| checkpoint | " + " | ".join(f"{s} {g}" for s, g in columns) + " |", "|---|" + "---|" * len(columns)]
    for rule, sel in selections.items():
        cells = [_pct(sel.metrics.get(s, {}).get("group_means", {}).get(g)) for s, g in columns]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot_run_curves(history: list[dict], metric: str, path: Path, title: str) -> None:
    """The primary metric of every evaluated set over training steps."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in history:
        for name, m in row["metrics"].items():
            if metric in m:
                curves.setdefault(name, []).append((row["step"], m[metric]))
    plot_curves(curves, path, title, f"{metric} (%)")
