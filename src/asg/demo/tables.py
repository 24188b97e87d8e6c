"""The demo reports' shared tables: mean ± std cells, each row's settings, the tuning's trials, cost and
backbone-rate tables, and the adaptation table."""

from __future__ import annotations

from typing import Any

import numpy as np

from asg.demo.benchmarks import Benchmark


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def fmt(ms: tuple[float, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if ms is None:
        return "–"
    return f"{scale * ms[0]:.{digits}f} ± {scale * ms[1]:.{digits}f}"


def run_settings(bench: Benchmark, label: str, settings: list[str], choice: list[str]) -> dict[str, Any]:
    """What differs between a benchmark's rows: the head's rate, the backbone's multiple of it, the method's own
    knob and the learning-rate controller, read from the config the label's runs were built from."""
    from asg.config import load_config
    from asg.methods import METHODS

    cfg = load_config(bench.methods[label], [*settings, *choice])
    knobs = METHODS[cfg.method.name].knobs if cfg.method.name in METHODS else ()
    own = {k.key.rsplit(".", 1)[-1]: getattr(cfg.method, k.key.rsplit(".", 1)[-1]) for k in knobs}
    return {
        "lr": cfg.optim.lr,
        "backbone_lr_mult": cfg.optim.backbone_lr_mult,
        "knob": own,
        "controller": cfg.l2o.controller,
    }


def settings_cells(settings: dict[str, Any] | None) -> list[str]:
    if not settings:
        return ["–"] * 4
    knob = ", ".join(f"{k} {v:.3g}" for k, v in settings["knob"].items()) or "–"
    schedule = {"fixed": "fixed", "l2o": "learned (L2O)", "random": "random"}.get(
        settings["controller"], settings["controller"]
    )
    return [f"{settings['lr']:.3g}", f"{settings['backbone_lr_mult']:.3g}× lr", knob, schedule]


def trials_markdown(bench: Benchmark, rows: list[dict]) -> str:
    """One line per trial of every study: its parameters, how far it trained, its score and the real sets."""
    real = bench.sets[1:]
    head = ["method", "trial", "state", "steps", "lr", "backbone rate", "own knob", f"{bench.sets[0]} score (used)"] + [
        f"{s} (not used)" for s in real
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        params = dict(row["params"])
        lr, mult = params.pop("optim.lr", None), params.pop("optim.backbone_lr_mult", None)
        knob = ", ".join(f"{k.rsplit('.', 1)[-1]} {v:.3g}" for k, v in params.items()) or "–"
        score = f"{100 * row['source_val']:.2f}" if row.get("source_val") is not None else "–"
        name = row["method"] + (" **chosen**" if row.get("chosen") else "")
        cells = [
            name,
            str(row["trial"]),
            row["state"],
            str(row["steps"]),
            f"{lr:.3g}" if lr else "–",
            f"{mult:.3g}×" if mult else "–",
            knob,
            score,
        ]
        cells += [f"{100 * row['real'][s]:.1f}" if s in row.get("real", {}) else "–" for s in real]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def backbone_rate_markdown(result: dict[str, Any]) -> str:
    """The backbone rate alone: per method and rate, the real score and the ImageNet KL (mean ± std over seeds)."""
    head = ["method", "backbone rate", f"{result['metric']} (%)", "ImageNet KL", "ImageNet top-1 agreement (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, cells in result["table"].items():
        for rate in sorted(cells, key=float):
            c = cells[rate]
            parts = [
                fmt(mean_std(c["real"]) if c["real"] else None),
                fmt(mean_std(c["kl"]) if c["kl"] else None, 1.0, 3),
                fmt(mean_std(c["top1"]) if c["top1"] else None),
            ]
            lines.append(f"| {label} | {rate}× | " + " | ".join(parts) + " |")
    choices = "; ".join(f"{k}: `{' '.join(v)}`" for k, v in result["choices"].items())
    return (
        f"The backbone rate alone ({result['seeds']} seeds, last checkpoint; every other setting at the "
        f"method's tuned point, {choices}, with the rate's override last):\n\n" + "\n".join(lines)
    )


def cost_markdown(costs: dict[str, dict]) -> str:
    """Per study: trials, how they ended, the training steps spent, against the full grid of the same knobs."""
    head = [
        "method",
        "trials",
        "complete",
        "pruned",
        "failed",
        "steps trained",
        "full grid: runs",
        "full grid: steps",
        "steps saved",
        "study wall time",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, c in costs.items():
        saved = 1 - c["steps_trained"] / c["full_grid_steps"] if c["full_grid_steps"] else 0.0
        cells = [
            label,
            c["trials"],
            c["complete"],
            c["pruned"],
            c["failed"],
            c["steps_trained"],
            c["full_grid_runs"],
            c["full_grid_steps"],
            f"{100 * saved:.0f} %",
            f"{c['study_wall_s'] / 60:.1f} min" if c.get("study_wall_s") else "–",
        ]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines)


def adaptation_table(bench: Benchmark, adaptations: list[dict]) -> dict[str, Any]:
    """Per starting method: mean ± std over seeds of each real set before and after adaptation, and of the last
    round's pseudo-label precision."""
    out: dict[str, Any] = {}
    for label in dict.fromkeys(a["method"] for a in adaptations):
        rows = [a for a in adaptations if a["method"] == label]
        entry: dict[str, Any] = {"seeds": len(rows)}
        for s in bench.sets[1:]:
            entry[f"before_{s}"] = mean_std([a["start"]["metrics"][s][bench.metric] for a in rows])
            entry[f"after_{s}"] = mean_std([a["rounds"][-1]["metrics"][s][bench.metric] for a in rows])
        precision = [a["rounds"][-1]["precision"]["precision"] for a in rows if a["rounds"][-1].get("precision")]
        if precision:
            entry["pseudo_precision"] = mean_std(precision)
        out[label] = entry
    return out


def adaptation_markdown(bench: Benchmark, table: dict[str, Any]) -> str:
    real = bench.sets[1:]
    head = ["starting model", "seeds"] + [f"{s} {when}" for s in real for when in ("before", "after")]
    head.append("pseudo-label precision (last round)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in table.items():
        cells = [label, str(e["seeds"])] + [fmt(e[f"{when}_{s}"]) for s in real for when in ("before", "after")]
        cells.append(fmt(e.get("pseudo_precision")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
