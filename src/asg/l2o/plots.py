"""Figures for L2O runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_scale_schedule(history: Sequence[dict[str, Any]], group_names: Sequence[str], path: str | Path) -> Path:
    """Step plot of the scale of each group over training; ``history`` rows are ``{"step", "scales"}``.

    Each scale holds from its ``step`` to the next row's step (piecewise constant, as applied).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [int(h["step"]) for h in history]
    fig, axes = plt.subplots(len(group_names), 1, figsize=(8, 1.1 * len(group_names) + 0.8), sharex=True, squeeze=False)
    for g, (ax, name) in enumerate(zip(axes[:, 0], group_names)):
        values = [float(h["scales"][g]) for h in history]
        ax.step(steps + [steps[-1] + 1], values + values[-1:], where="post", color=f"C{g % 10}")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle("learning-rate scale per layer group")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_meta_rewards(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Mean reward (and mean policy entropy, if present) per meta-training episode from ``meta_history`` rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    episodes = [int(r["episode"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(episodes, [r.get("mean_reward", float("nan")) for r in rows], marker="o", label="mean reward")
    ax.set_xlabel("episode")
    ax.set_ylabel("mean reward per decision")
    ax.grid(alpha=0.3)
    if any("mean_entropy" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot(episodes, [r.get("mean_entropy", float("nan")) for r in rows], color="C1", ls="--", label="entropy")
        ax2.set_ylabel("policy entropy per group")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
