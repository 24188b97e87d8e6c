"""The embedded synthetic-to-real benchmarks behind ``asg demo``: digits (classification) and digit scenes
(segmentation).

Within a benchmark every method trains on the same synthetic data, with the same seeds, steps and rates, and is
evaluated during training on the held-out synthetic split and the real sets. Finished runs are skipped and
interrupted ones resumed, so re-running the command continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asg.config import load_config
from asg.engine.report import plot_curves, plot_per_class
from asg.engine.rundir import RunDir
from asg.errors import ConfigError


@dataclass(frozen=True)
class Benchmark:
    """One embedded benchmark of the demo: its methods (label -> recipe), sets, headline metric and lengths."""

    name: str
    title: str
    metric: str  # "mean_class_acc" | "miou"
    metric_label: str
    per_class_key: str  # "per_class" | "per_class_iou"
    methods: dict[str, str]
    default_methods: tuple[str, ...]  # run by `asg demo` (all of ``methods`` with --full)
    default_seeds: int  # seeds of `asg demo` and `asg demo --full` (1 with --quick)
    sets: tuple[str, ...]  # source-val first, then the real sets
    default: tuple[str, ...]  # overrides of `asg demo`
    quick: tuple[str, ...]
    full: tuple[str, ...]


DIGITS = Benchmark(
    name="digits",
    title="synthetic -> real digits (classification)",
    metric="mean_class_acc",
    metric_label="mean per-class accuracy",
    per_class_key="per_class",
    methods={
        "erm": "digits_erm",
        "asg": "digits_asg",
        "l2sp": "digits_l2sp",
        "asg+l2o": "digits_asg_l2o",
        "asg+random": "digits_asg_random",
    },
    default_methods=("erm", "asg"),
    default_seeds=2,
    sets=("synthetic", "mnist5k", "uci_digits"),
    default=("train.steps=100", "train.eval_every=50", "data.eval_max_per_set=300", "eval.full_eval_selected=false"),
    quick=(
        "train.steps=100",
        "train.eval_every=25",
        "data.num_train=2000",
        "data.eval_max_per_set=200",
        "eval.full_eval_selected=false",
    ),  # fmt: skip
    full=("train.steps=300", "train.eval_every=75", "data.eval_max_per_set=300", "eval.full_eval_selected=false"),
)
SCENES = Benchmark(
    name="scenes",
    title="synthetic -> real digit scenes (segmentation)",
    metric="miou",
    metric_label="mIoU",
    per_class_key="per_class_iou",
    methods={"erm": "digit_scenes_erm", "asg": "digit_scenes_asg", "asg+l2o": "digit_scenes_asg_l2o"},
    default_methods=("erm", "asg", "asg+l2o"),
    default_seeds=3,
    sets=("synthetic", "mnist_photos"),
    default=("train.steps=150", "train.eval_every=75", "data.eval_max_per_set=200", "eval.full_eval_selected=false"),
    quick=(
        "train.steps=80",
        "train.eval_every=40",
        "data.num_train=800",
        "data.eval_max_per_set=100",
        "eval.full_eval_selected=false",
    ),  # fmt: skip
    full=("train.steps=400", "train.eval_every=100", "data.eval_max_per_set=200", "eval.full_eval_selected=false"),
)
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (DIGITS, SCENES)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _train_one(recipe: str, overrides: list[str], out_dir: Path, data) -> dict[str, Any]:
    from asg.engine.trainer import Trainer

    if (out_dir / "done").exists():
        return json.loads((out_dir / "summary.json").read_text())
    resume = RunDir(out_dir).has_checkpoint()
    cfg = load_config(out_dir / "config.yaml" if resume else recipe, overrides)
    Trainer(cfg, out_dir, data=data, resume=resume).run()
    return json.loads((out_dir / "summary.json").read_text())


def run_demo(
    out: str | Path | None = None,
    quick: bool = False,
    seeds: int | None = None,
    methods: list[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    benchmarks: list[str] | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """Train and evaluate each benchmark's methods over ``seeds`` seeds; write report.md/report.json and plots.

    Each benchmark goes to ``out/<benchmark>/`` (its own report) and ``out/report.md`` gathers them. ``methods``
    picks labels present in a benchmark (others are skipped there); ``full`` runs every method, longer.
    """
    out_dir = Path(out) if out is not None else Path("runs") / ("demo-quick" if quick else "demo")
    names = benchmarks or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown demo benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    known = {m for n in names for m in BENCHMARKS[n].methods}
    bad = [m for m in methods or [] if m not in known]
    if bad:
        raise ConfigError(f"unknown demo method {bad[0]!r}; choose from {', '.join(sorted(known))}")
    with RunDir(out_dir):  # one demo per folder at a time
        t0 = time.time()
        reports = {}
        for name in names:
            bench = BENCHMARKS[name]
            chosen = [m for m in (methods or (bench.methods if full else bench.default_methods)) if m in bench.methods]
            if chosen:
                reports[name] = _run_benchmark(bench, out_dir / name, quick, full, seeds, chosen, overrides)
        wall = time.time() - t0
        combined = {"wall_time_s": round(wall, 1), "benchmarks": reports, "out_dir": str(out_dir)}
        (out_dir / "report.md").write_text(_combined_markdown(reports, wall))
        combined["markdown_table"] = "\n\n".join(
            f"{BENCHMARKS[n].title}, {BENCHMARKS[n].metric_label} (%):\n{r['markdown_table']}"
            for n, r in reports.items()
        )
        return combined


def _run_benchmark(
    bench: Benchmark,
    out_dir: Path,
    quick: bool,
    full: bool,
    seeds: int | None,
    methods: list[str],
    overrides: list[str] | tuple[str, ...],
) -> dict[str, Any]:
    from asg.data import build_data

    seeds = seeds if seeds is not None else (1 if quick else bench.default_seeds if not full else 3)
    common = list(bench.quick if quick else bench.full if full else bench.default) + list(overrides)
    t0 = time.time()
    data = build_data(load_config(bench.methods[methods[0]], common).data)
    summaries = []
    for seed in range(seeds):
        for method in methods:
            run_overrides = common + [f"train.seed={seed}", f"name={method}_seed{seed}"]
            summary = _train_one(bench.methods[method], run_overrides, out_dir / "runs" / f"{method}_seed{seed}", data)
            summary["label"] = method
            summaries.append(summary)
    return build_report(bench, summaries, out_dir, quick=quick, wall_s=time.time() - t0, settings=common)


def build_report(
    bench: Benchmark, summaries: list[dict], out_dir: Path, quick: bool, wall_s: float, settings: list[str]
) -> dict:
    """Aggregate a benchmark's run summaries into report.json, report.md and plots."""
    metric, real_sets = bench.metric, bench.sets[1:]
    runs: list[dict[str, Any]] = []
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}  # label -> set -> step -> one value per seed
    per_class: dict[str, list[list[float]]] = {}  # label -> one per-class list (first real set) per seed
    labels = list(dict.fromkeys(s["label"] for s in summaries))
    class_names = summaries[0]["class_names"]
    for s in summaries:
        last = s["selections"]["last"]
        metrics = {
            k: {key: val for key, val in v.items() if not key.startswith("per_class")}
            for k, v in last["metrics"].items()
        }
        runs.append(
            {
                "method": s["label"],
                "seed": s["seed"],
                "selection": "last",
                "step": last["step"],
                "tta_flip": last["tta_flip"],
                "metrics": metrics,
                "oracle": _brief(s["selections"].get("oracle"), metric),
                "source_val": _brief(s["selections"].get("source-val"), metric),
            }
        )
        per_class.setdefault(s["label"], []).append(last["metrics"][real_sets[0]][bench.per_class_key])
        hist = _read_history(out_dir / "runs" / f"{s['label']}_seed{s['seed']}" / "results.jsonl")
        for row in hist:
            for set_name, m in row["metrics"].items():
                curves.setdefault(s["label"], {}).setdefault(set_name, {}).setdefault(row["step"], []).append(m[metric])
    table = {}
    for label in labels:
        rows = [r for r in runs if r["method"] == label]
        entry: dict[str, Any] = {}
        for set_name in bench.sets:
            vals = [r["metrics"][set_name][metric] for r in rows if set_name in r["metrics"]]
            if vals:
                entry[set_name] = _mean_std(vals)
        for key in ("top1_agreement", "kl"):
            vals = [r["metrics"]["real_photos"][key] for r in rows if "real_photos" in r["metrics"]]
            if vals:
                entry[f"real_photos_{key}"] = _mean_std(vals)
        for set_name in real_sets:
            vals = [
                r["oracle"]["metrics"][set_name] for r in rows if r["oracle"] and set_name in r["oracle"]["metrics"]
            ]
            if vals:
                entry[f"oracle_{set_name}"] = _mean_std(vals)
        entry["seeds"] = len(rows)
        table[label] = entry
    mean_curves = {
        label: {k: sorted((step, float(np.mean(v))) for step, v in d.items()) for k, d in sets.items()}
        for label, sets in curves.items()
    }
    plots = []
    for set_name in bench.sets:
        path = out_dir / f"curve_{set_name}.png"
        plot_curves(
            {label: mean_curves[label].get(set_name, []) for label in labels},
            path,
            title=f"{set_name}: {bench.metric_label} during training (mean over seeds)",
            ylabel=f"{bench.metric_label} (%)",
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
    report = {
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
        "runs": runs,
        "table": table,
        "curves": mean_curves,
        "plots": plots,
    }
    report["markdown_table"] = markdown_table(bench, table)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(_markdown(bench, report))
    report["out_dir"] = str(out_dir)
    return report


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


def _fmt(ms: tuple[float, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if ms is None:
        return "–"
    return f"{scale * ms[0]:.{digits}f} ± {scale * ms[1]:.{digits}f}"


def markdown_table(bench: Benchmark, table: dict) -> str:
    header = ["method", "seeds", *(f"{s} (held-out)" if i == 0 else s for i, s in enumerate(bench.sets))]
    header += ["ImageNet top-1 agreement", "ImageNet KL"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, e in table.items():
        cells = [label, str(e["seeds"]), *(_fmt(e.get(s)) for s in bench.sets)]
        cells += [_fmt(e.get("real_photos_top1_agreement")), _fmt(e.get("real_photos_kl"), 1.0, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(bench: Benchmark, report: dict) -> str:
    p = report["protocol"]
    real = bench.sets[1:]
    oracle = ["| method | " + " | ".join(f"{s} (oracle)" for s in real) + " |", "|---|" + "---|" * len(real)]
    for label, e in report["table"].items():
        oracle.append(f"| {label} | " + " | ".join(_fmt(e.get(f"oracle_{s}")) for s in real) + " |")
    plots = "\n".join(f"![{name}]({name})" for name in report["plots"])
    caps = {r["oracle"]["eval_max_per_set"] for r in report["runs"] if r["oracle"]}
    cap = next(iter(caps - {None}), None)
    where = (
        f"on the class-balanced subsets of the training curves ({cap} images per set)" if cap else "on the full sets"
    )
    return f"""# asg demo: {bench.title}

{bench.metric_label} (%) as mean ± std over seeds, **last checkpoint** (no early stopping), full
evaluation sets, tta_flip={p["tta_flip"]}. ImageNet retention: top-1 agreement (%) and KL(teacher ‖ model) of
the frozen ImageNet head against the frozen teacher on the real photos shipped with scikit-image and scikit-learn.
Wall time {report["wall_time_s"] / 60:.1f} min; settings: `{" ".join(p["settings"])}`.

{report["markdown_table"]}

Oracle selection (the best evaluation step chosen **with the real test labels**: an upper bound, not a valid
protocol), selected on {real[0]} and evaluated {where}:

{chr(10).join(oracle)}

{plots}

Per-run details: `runs/<method>_seed<k>/summary.json` (every selection rule, labelled), `results.jsonl`
(one line per evaluation during training) and `report.md`.
"""


def _combined_markdown(reports: dict[str, dict], wall_s: float) -> str:
    parts = [f"# asg demo\n\nWall time {wall_s / 60:.1f} min for {len(reports)} benchmark(s).\n"]
    for name, r in reports.items():
        bench = BENCHMARKS[name]
        parts.append(f"## {bench.title}: {bench.metric_label} (%), last checkpoint\n\n{r['markdown_table']}\n\n"
                     f"Details, oracle rows and plots: [{name}/report.md]({name}/report.md)\n")  # fmt: skip
    return "\n".join(parts)
