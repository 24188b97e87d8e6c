"""The backbone rate measured on its own: ERM and ASG at their tuned point, with only ``optim.backbone_lr_mult``
changed, at the long protocol's length; the real score and the ImageNet KL against the rate (``asg demo --full
--backbone-rates``).

Each method's tuned overrides come from its ``asg demo --full`` study (the same folder); the rate's override goes
last, so it replaces the tuned one. Runs live in ``<out>/<benchmark>/backbone_rate/<label>_bb<rate>_seed<k>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from asg.demo.benchmarks import Benchmark
from asg.demo.runs import train_all
from asg.io import atomic_write_text

RATES = (0.03, 0.1, 0.3, 1.0)


def backbone_rate_runs(
    bench: Benchmark,
    out_dir: Path,
    common: list[str],
    choices: dict[str, list[str]],
    labels: tuple[str, ...] = ("erm", "asg"),
    rates: tuple[float, ...] | None = None,
    seeds: int = 3,
    jobs: int = 1,
) -> dict[str, Any]:
    """Train every (label, rate, seed) and gather, per label and rate, the last checkpoint's real scores and its
    ImageNet KL (mean and std over seeds); writes ``backbone_rate.json`` and ``backbone_rate.png`` in ``out_dir``."""
    rates = rates or RATES
    tasks, keys = [], []
    for label in labels:
        for rate in rates:
            for seed in range(seeds):
                name = f"{label}_bb{rate:g}_seed{seed}"
                over = [
                    *common,
                    *choices.get(label, []),
                    f"optim.backbone_lr_mult={rate}",
                    f"train.seed={seed}",
                    f"name={name}",
                ]
                tasks.append((bench.methods[label], over, out_dir / "backbone_rate" / name))
                keys.append((label, rate))
    summaries = train_all(tasks, jobs)
    table: dict[str, dict[str, Any]] = {}
    for (label, rate), summary in zip(keys, summaries):
        metrics = summary.selections["last"].metrics
        cell = table.setdefault(label, {}).setdefault(f"{rate:g}", {"real": [], "kl": [], "top1": []})
        cell["real"].append(float(np.mean([metrics[s][bench.metric] for s in bench.sets[1:] if s in metrics])))
        if "real_photos" in metrics:
            cell["kl"].append(metrics["real_photos"]["kl"])
            cell["top1"].append(metrics["real_photos"]["top1_agreement"])
    result = {
        "benchmark": bench.name,
        "metric": f"mean of {', '.join(bench.sets[1:])} {bench.metric}",
        "rates": list(rates),
        "seeds": seeds,
        "choices": {k: choices.get(k, []) for k in labels},
        "settings": common,
        "table": table,
    }
    atomic_write_text(out_dir / "backbone_rate.json", json.dumps(result, indent=1))
    plot_backbone_rate(result, out_dir / "backbone_rate.png")
    return result


def plot_backbone_rate(result: dict[str, Any], path: Path) -> None:
    """Two panels against the backbone rate (log axis): the real score and the ImageNet KL, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, cells in result["table"].items():
        rates = sorted(cells, key=float)
        x = [float(r) for r in rates]
        for ax, key, scale in ((axes[0], "real", 100.0), (axes[1], "kl", 1.0)):
            vals = [np.asarray(cells[r][key], dtype=float) * scale for r in rates]
            if not all(len(v) for v in vals):
                continue
            mean, std = [v.mean() for v in vals], [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)
    axes[0].set_ylabel("real test sets, mean (%)")
    axes[1].set_ylabel("ImageNet KL(teacher ‖ model), real photos")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("optim.backbone_lr_mult (backbone rate / head rate)")
        ax.grid(alpha=0.3)
        ax.legend()
    what = f"{result['metric']}; {result['seeds']} seed(s), last checkpoint"
    fig.suptitle(f"{result['benchmark']}: the backbone rate alone ({what})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
