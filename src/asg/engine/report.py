"""Plots and human-readable reports (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str, ylabel: str) -> None:
    """One line per label: ``curves[label] = [(step, value), ...]``; values in [0, 1] shown in %."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, [100 * v for v in values], marker="o", ms=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
