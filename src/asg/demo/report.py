"""The demo's reports: per benchmark report.json / report.md and plots, and the combined report.md."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from asg.demo.benchmarks import BENCHMARKS, Benchmark
from asg.demo.tables import (
    adaptation_markdown,
    adaptation_table,
    backbone_rate_markdown,
    cost_markdown,
    fmt,
    mean_std,
    run_settings,
    settings_cells,
    trials_markdown,
)
from asg.engine.evaluation.report import plot_curves, plot_per_class
from asg.io import atomic_write


def build_report(
    bench: Benchmark,
    summaries: list[dict],
    out_dir: Path,
    quick: bool,
    wall_s: float,
    settings: list[str],
    grid: list[dict] | None = None,
    tuning_cost: dict[str, dict] | None = None,
    choices: dict[str, list[str]] | None = None,
    choice_rule: str = "",
    adaptations: list[dict] | None = None,
    train_wall_s: float | None = None,
    shared_train_s: float | None = None,
    backbone_rate: dict[str, Any] | None = None,
) -> dict:
    """Aggregate a benchmark's run summaries (and tuning grid, adaptations) into report.json, report.md, plots.

    ``shared_train_s``: the wall time of the one queue that trained every benchmark's runs, when it did."""
    metric, real_sets = bench.metric, bench.sets[1:]
    runs: list[dict[str, Any]] = []
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}  # label -> set -> step -> one value per seed
    per_class: dict[str, list[list[float]]] = {}  # label -> one per-class list (first real set) per seed
    labels = list(dict.fromkeys(s["label"] for s in summaries))
    class_names = summaries[0]["class_names"]
    for s in summaries:
        last = s["selections"]["last"]
        metrics = {
            k: {key: val for key, val in v.items() if key not in (bench.per_class_key, "group_means")}
            | group_means(bench, v)
            for k, v in last["metrics"].items()
        }
        runs.append(
            {
                "method": s["label"],
                "seed": s["seed"],
                "selection": "last",
                "step": last["step"],
                "tta_flip": last["tta_flip"],
                "wise_ft_alpha": last.get("wise_ft_alpha"),
                "metrics": metrics,
                "oracle": _brief(s["selections"].get("oracle"), metric),
                "source_val": _brief(s["selections"].get("source-val"), metric),
            }
        )
        per_class.setdefault(s["label"], []).append(last["metrics"][real_sets[0]][bench.per_class_key])
        folder = Path(s["run_dir"]) if "run_dir" in s else out_dir / "runs" / f"{s['label']}_seed{s['seed']}"
        hist = _read_history(folder / "results.jsonl")
        for row in hist:
            for set_name, m in row["metrics"].items():
                by_set = curves.setdefault(s["label"], {})
                by_set.setdefault(set_name, {}).setdefault(row["step"], []).append(m[metric])
                for key, value in group_means(bench, m).items():  # e.g. "mnist_photos_digit_iou"
                    by_set.setdefault(f"{set_name}_{key}", {}).setdefault(row["step"], []).append(value)
    table = {}
    for label in labels:
        rows = [r for r in runs if r["method"] == label]
        entry: dict[str, Any] = {}
        for set_name in bench.sets:
            vals = [r["metrics"][set_name][metric] for r in rows if set_name in r["metrics"]]
            if vals:
                entry[set_name] = mean_std(vals)
            for group, _ in bench.class_groups:
                vals = [r["metrics"][set_name][f"{group}_iou"] for r in rows if set_name in r["metrics"]]
                if vals:
                    entry[f"{set_name}_{group}_iou"] = mean_std(vals)
        alphas = [r["wise_ft_alpha"] for r in rows if r.get("wise_ft_alpha") is not None]
        if alphas:
            entry["wise_ft_alpha"] = alphas
        for key in ("top1_agreement", "kl"):
            vals = [r["metrics"]["real_photos"][key] for r in rows if "real_photos" in r["metrics"]]
            if vals:
                entry[f"real_photos_{key}"] = mean_std(vals)
        for set_name in real_sets:
            for rule in ("oracle", "source_val"):
                vals = [r[rule]["metrics"][set_name] for r in rows if r[rule] and set_name in r[rule]["metrics"]]
                if vals:
                    entry[f"{rule}_{set_name}"] = mean_std(vals)
        entry["seeds"] = len(rows)
        entry["settings"] = run_settings(bench, label, settings, (choices or {}).get(label, []))
        table[label] = entry
    mean_curves = {
        label: {k: sorted((step, float(np.mean(v))) for step, v in d.items()) for k, d in sets.items()}
        for label, sets in curves.items()
    }
    plots = []
    for set_name in bench.sets:  # (file name, curve key, what is plotted); segmentation adds its class groups
        figures = [(set_name, set_name, bench.metric_label)]
        figures += [(f"{set_name}_{g}", f"{set_name}_{g}_iou", f"mean {g} IoU") for g, _ in bench.class_groups]
        for name, key, what in figures:
            path = out_dir / f"curve_{name}.png"
            plot_curves(
                {label: mean_curves[label].get(key, []) for label in labels if label in mean_curves},
                path,
                title=f"{set_name}: {what} during training (mean over seeds)",
                ylabel=f"{what} (%)",
            )
            plots.append(path.name)
    bars = out_dir / f"per_class_{real_sets[0]}.png"
    plot_per_class(
        {label: list(np.mean(np.asarray(v, dtype=float), axis=0)) for label, v in per_class.items()},
        class_names,
        bars,
        title=f"{real_sets[0]} per-class {bench.per_class_key[10:] or 'accuracy'} (last checkpoint, mean over seeds)",
    )
    plots.append(bars.name)
    for s in summaries:
        if s["seed"] == 0 and len(s.get("controller_history", [])) > 1:
            from asg.l2o.plots import plot_scale_schedule

            path = out_dir / f"scales_{s['label'].replace('+', '_')}.png"
            plot_scale_schedule(s["controller_history"], s["group_names"], path)
            plots.append(path.name)
    report: dict[str, Any] = {
        "benchmark": bench.name,
        "protocol": {
            "selection": "last",
            "tta_flip": runs[0]["tta_flip"] if runs else False,
            "metric": bench.metric_label,
            "eval_sets": "full sets at the last step",
            "quick": quick,
            "settings": settings,
        },
        "wall_time_s": round(wall_s, 1),
        "train_wall_time_s": round(train_wall_s if train_wall_s is not None else wall_s, 1),
        "shared_train_wall_time_s": None if shared_train_s is None else round(shared_train_s, 1),
        "timing": runs_timing(summaries, train_wall_s if train_wall_s is not None else wall_s),
        "choices": choices or {},
        "choice_rule": choice_rule,
        "grid": grid or [],
        "tuning_cost": tuning_cost or {},
        "backbone_rate": backbone_rate,
        "adaptation": adaptation_table(bench, adaptations or []),
        "adaptations": adaptations or [],
        "runs": runs,
        "table": table,
        "curves": mean_curves,
        "plots": plots,
    }
    report["markdown_table"] = markdown_table(bench, table)
    if adaptations:
        report["adaptation_markdown"] = adaptation_markdown(bench, report["adaptation"])
    write_report(out_dir / "report.json", json.dumps(report, indent=1))
    write_report(out_dir / "report.md", _markdown(bench, report))
    report["out_dir"] = str(out_dir)
    return report


def write_report(path: Path, text: str) -> None:
    """Write a report atomically; an earlier one (a finished demo in the same ``--out``) is kept beside it as
    ``<name>.<its time>.<ext>``, with a note, never overwritten silently."""
    if path.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        kept = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
        os.replace(path, kept)
        print(f"asg demo: note: the earlier {path} was kept as {kept.name}", flush=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _brief(sel: dict | None, metric: str) -> dict | None:
    if not sel:
        return None
    return {
        "step": sel["step"],
        "selected_on": sel.get("selected_on"),
        "eval_max_per_set": sel.get("eval_max_per_set"),
        "metrics": {k: v[metric] for k, v in sel["metrics"].items() if metric in v},
    }


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def group_means(bench: Benchmark, metrics: dict[str, Any]) -> dict[str, float]:
    """``{"<group>_iou": mean IoU over the group's classes present in the set}`` for ``bench.class_groups``: the
    evaluation's ``group_means``, or (runs from before it) the task's computation of them."""
    if not bench.class_groups or bench.per_class_key not in metrics:
        return {}
    means = metrics.get("group_means") or bench.task.group_means(metrics, dict(bench.class_groups))
    values = {g: means.get(g) for g, _ in bench.class_groups}
    return {f"{g}_iou": float("nan") if v is None else float(v) for g, v in values.items()}


def markdown_table(bench: Benchmark, table: dict) -> str:
    columns = []  # (header, key)
    for i, s in enumerate(bench.sets):
        name = f"{s} (held-out)" if i == 0 else s
        columns.append((f"{name} {bench.metric_label}" if bench.class_groups else name, s))
        columns += [(f"{s} {group} IoU", f"{s}_{group}_iou") for group, _ in bench.class_groups]
    header = [
        "method",
        "lr",
        "backbone rate",
        "own knob",
        "LR schedule",
        "seeds",
        *(h for h, _ in columns),
        "ImageNet top-1 agreement",
        "ImageNet KL",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, e in table.items():
        alphas = e.get("wise_ft_alpha")
        name = f"{label} (α {', '.join(f'{a:g}' for a in alphas)})" if alphas else label  # per seed, from source-val
        cells = [name, *settings_cells(e.get("settings")), str(e["seeds"]), *(fmt(e.get(key)) for _, key in columns)]
        cells += [fmt(e.get("real_photos_top1_agreement")), fmt(e.get("real_photos_kl"), 1.0, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(bench: Benchmark, report: dict) -> str:
    p = report["protocol"]
    real = bench.sets[1:]
    head = ["method"] + [f"{s} ({rule})" for s in real for rule in ("last", "source-val", "oracle")]
    oracle = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in report["table"].items():
        cells = [fmt(e.get(key)) for s in real for key in (s, f"source_val_{s}", f"oracle_{s}")]
        oracle.append(f"| {label} | " + " | ".join(cells) + " |")
    extra = ""
    if report.get("choices") or report.get("grid"):
        chosen = ", ".join(f"{k}: `{' '.join(v)}`" for k, v in report["choices"].items()) or "recipe defaults"
        extra += f"\nHyper-parameters per method ({report['choice_rule']}): {chosen}.\n"
    if report.get("grid"):
        costs: dict[str, dict[str, Any]] = report.get("tuning_cost") or {}
        rule = next((c.get("rule", "") for c in costs.values()), "")
        extra += (
            f"\nTuning: one Optuna study per method at this length, the same budget, sampler and pruner ({rule}); "
            "each trial draws optim.lr, optim.backbone_lr_mult and the method's own knob; the score is the "
            "held-out synthetic split's metric, ties broken by its loss; the real sets are shown, never used "
            f"(WiSE-FT takes ERM's choice, its alpha chosen per run on source-val):\n\n"
            f"{trials_markdown(bench, report['grid'])}\n\nWhat the pruner spent, against running the full grid of "
            f"the same knobs' grid values to the end:\n\n{cost_markdown(report.get('tuning_cost', {}))}\n"
        )
    if report.get("backbone_rate"):
        extra += f"\n{backbone_rate_markdown(report['backbone_rate'])}\n\n![backbone rate](backbone_rate.png)\n"
    if report.get("adaptation_markdown"):
        extra += (
            f"\nDomain adaptation (`asg adapt`, class-balanced self-training to the unlabelled "
            f"{bench.adapt_target}; the same rounds for every starting model; test halves before and after, last "
            f"round's weights, mean ± std over seeds):\n\n{report['adaptation_markdown']}\n"
        )
    plots = "\n".join(f"![{name}]({name})" for name in report["plots"])
    caps = {r["oracle"]["eval_max_per_set"] for r in report["runs"] if r["oracle"]}
    cap = next(iter(caps - {None}), None)
    where = (
        f"on the class-balanced subsets of the training curves ({cap} images per set)" if cap else "on the full sets"
    )
    train_min = report["train_wall_time_s"] / 60
    wall = f"Wall time {report['wall_time_s'] / 60:.1f} min (training runs {train_min:.1f} min{_timing_words(report)})"
    if report.get("shared_train_wall_time_s") is not None:
        wall = (
            f"Wall time {report['wall_time_s'] / 60:.1f} min after training; the runs of every benchmark trained "
            f"in one queue, longest first, in {report['shared_train_wall_time_s'] / 60:.1f} min"
            f"{_timing_words(report)}"
        )
    return f"""# asg demo: {bench.title}

{bench.metric_label} (%) as mean ± std over seeds, **last checkpoint** (no early stopping), full
evaluation sets, tta_flip={p["tta_flip"]}. ImageNet retention: top-1 agreement (%) and KL(teacher ‖ model) of
the frozen ImageNet head against the frozen teacher on the real photos shipped with scikit-image and scikit-learn.
{wall};
settings: `{" ".join(p["settings"])}`.

{report["markdown_table"]}
{extra}
Checkpoint rules side by side: last (no early stopping), best source-val step (held-out synthetic split: a valid
protocol) and oracle (the best step chosen **with the real test labels**: an upper bound, not a valid protocol,
selected on {real[0]}); source-val and oracle evaluated {where}:

{chr(10).join(oracle)}

{_along_training(bench, report)}

{plots}

Per-run details: `runs/<method>_seed<k>/summary.json` (every selection rule, labelled), `results.jsonl`
(one line per evaluation during training) and `report.md`.
"""


def _along_training(bench: Benchmark, report: dict) -> str:
    """Markdown: per method, the mean curve's peak on each real set (and class group), its step, the last value."""
    keys = [(s, s) for s in bench.sets[1:]]
    keys += [
        (f"{s}_{g}_iou", f"{s} {g} IoU") for s in bench.sets[1:] for g, _ in bench.class_groups if g != "background"
    ]
    head = ["method"] + [f"{name} {what}" for _, name in keys for what in ("peak (step)", "last", "peak − last")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, curves in report["curves"].items():
        cells = []
        for key, _ in keys:
            points = curves.get(key) or []
            if not points:
                cells += ["–"] * 3
                continue
            step, peak = max(points, key=lambda p: p[1])
            last = points[-1][1]
            cells += [f"{100 * peak:.1f} ({step})", f"{100 * last:.1f}", f"{100 * (peak - last):.1f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return (
        "Along training (the curves below: mean over seeds, on the evaluation subsets of the curves; does a "
        "method peak and fall?):\n\n" + "\n".join(lines)
    )


def runs_timing(summaries: list[dict], train_wall_s: float) -> dict[str, Any]:
    """Seconds per trainer phase summed over the runs trained now (a reused finished run counts its own), and the
    share of training steps in the training stage's wall time (building the data included)."""
    timings = [s["timing"] for s in summaries if s.get("timing")]
    if not timings:
        return {}
    # seconds of each phase (not the rate steps_per_s); a part a run lacks (null: a resumed run that trained no
    # step) counts 0
    phases = sorted({k for t in timings for k in t if k.endswith("_s") and k not in ("wall_s", "steps_per_s")})
    out: dict[str, Any] = {k: round(sum(_seconds(t.get(k)) for t in timings), 1) for k in phases}
    out["runs"], out["steps"] = len(timings), sum(int(t.get("steps") or 0) for t in timings)
    out["train_step_fraction"] = round(out.get("train_step_s", 0.0) / train_wall_s, 4) if train_wall_s > 0 else None
    return out


def _seconds(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _timing_words(report: dict) -> str:
    t = report.get("timing") or {}
    if not t.get("runs"):
        return ""
    evaluation = t.get("eval_s", 0) + t.get("final_s", 0)
    return (
        f"; the {t['runs']} runs of the table spent {t['train_step_s'] / 60:.1f} min in training steps and "
        f"{evaluation / 60:.1f} min in evaluation, summed over runs, which overlap when several run at a "
        "time"
    )


def combined_markdown(reports: dict[str, dict], wall_s: float, jobs: int = 1) -> str:
    parts = [
        f"# asg demo\n\nWall time {wall_s / 60:.1f} min for {len(reports)} benchmark(s), {jobs} run(s) at a time.\n"
    ]
    for name, r in reports.items():
        bench = BENCHMARKS[name]
        parts.append(
            f"## {bench.title}: {bench.metric_label} (%), last checkpoint\n\n{r['markdown_table']}\n\n"
            f"Details, oracle rows and plots: [{name}/report.md]({name}/report.md)\n"
        )
        if r.get("adaptation_markdown"):
            parts.append(
                f"Adaptation to {bench.adapt_target} (test halves before/after):\n\n{r['adaptation_markdown']}\n"
            )
    return "\n".join(parts)
