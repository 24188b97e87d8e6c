"""The embedded synthetic-to-real benchmarks behind ``asg demo``: digits (classification) and digit scenes
(segmentation).

Within a benchmark every method trains on the same synthetic data, with the same seeds, steps and rates, and is
evaluated during training on the held-out synthetic split and the real sets. Finished runs are skipped and
interrupted ones resumed, so re-running the command continues where it stopped.

Fair tuning (``--full`` or ``tune=True``): each method's own hyper-parameter (ERM's learning rate, ASG's lambda,
L2-SP's alpha) gets the same grid of three values, trained with seed 0 at the benchmark's length, and the value
with the best **source-val** score of the last checkpoint is chosen (no real label is used); the report shows
the whole grid. Without tuning, the values in ``Benchmark.chosen`` are used (chosen by that rule on a grid run
at the default length; see docs/demo). Digits then adapts every trained model to the unlabelled adaptation half
of MNIST-5k (``asg adapt``, the same self-training for every starting model) and reports the test halves before
and after.
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
    # fair tuning: label -> (config key, grid values); labels in grid_from take another label's choice
    grid: tuple[tuple[str, str, tuple[float, ...]], ...] = ()
    grid_from: tuple[tuple[str, str], ...] = ()
    chosen: tuple[tuple[str, str], ...] = ()  # label -> "key=value" used when not tuning
    # adaptation of every trained model to an unlabelled target set (None: no adaptation stage)
    adapt_target: str | None = None
    adapt: tuple[str, ...] = ()
    adapt_quick: tuple[str, ...] = ()


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
    default_methods=("erm", "asg", "asg+l2o"),
    default_seeds=3,
    sets=("synthetic", "mnist5k_test", "uci_digits_test"),
    default=(
        "data.real_split=halves",
        "train.steps=100",
        "train.eval_every=50",
        "data.eval_max_per_set=300",
        "eval.full_eval_selected=false",
    ),
    quick=(
        "data.real_split=halves",
        "train.steps=100",
        "train.eval_every=25",
        "data.num_train=2000",
        "data.eval_max_per_set=200",
        "eval.full_eval_selected=false",
    ),  # fmt: skip
    full=(
        "data.real_split=halves",
        "train.steps=1200",
        "train.eval_every=150",
        "data.eval_max_per_set=300",
        "eval.full_eval_selected=true",
    ),
    grid=(
        ("erm", "optim.lr", (0.003, 0.01, 0.03)),
        ("asg", "method.kl_weight", (0.01, 0.1, 1.0)),
        ("l2sp", "method.l2sp_alpha", (0.001, 0.01, 0.1)),
    ),
    grid_from=(("asg+l2o", "asg"), ("asg+random", "asg")),
    # chosen on source-val by `asg demo --benchmarks digits --tune --no-adapt --seeds 1 --methods erm,asg,l2sp`
    # at the default length (docs/demo/digits_grid/report.md)
    chosen=(("erm", "optim.lr=0.03"), ("asg", "method.kl_weight=0.01"), ("l2sp", "method.l2sp_alpha=0.01")),
    adapt_target="mnist5k_adapt",
    adapt=(
        "method.name=erm",  # the same self-training (CBST: cross-entropy on both parts) for every starting model
        "lr_controller=fixed",
        "optim.backbone_lr_mult=0.1",
        "optim.warmup_steps=0",
        "adapt.rounds=2",
        "adapt.steps_per_round=25",
        "train.eval_every=25",
        "data.eval_max_per_set=null",  # the round's last evaluation is on the full test halves, once
        "eval.retention=false",
    ),
    adapt_quick=("adapt.rounds=1", "adapt.steps_per_round=20", "train.eval_every=20"),
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
    tune: bool | None = None,
    adapt: bool = True,
) -> dict[str, Any]:
    """Train and evaluate each benchmark's methods over ``seeds`` seeds; write report.md/report.json and plots.

    Each benchmark goes to ``out/<benchmark>/`` (its own report) and ``out/report.md`` gathers them. ``methods``
    picks labels present in a benchmark (others are skipped there); ``full`` runs every method, longer, after
    tuning each on its grid (``tune``, default: ``full``); ``adapt`` runs the adaptation stage where a benchmark
    has one.
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
                do_tune = full if tune is None else tune
                reports[name] = _run_benchmark(bench, out_dir / name, quick, full, seeds, chosen, overrides,
                                               do_tune, adapt)  # fmt: skip
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
    tune: bool = False,
    adapt: bool = True,
) -> dict[str, Any]:
    from asg.data import build_data

    seeds = seeds if seeds is not None else (1 if quick else bench.default_seeds if not full else 3)
    common = list(bench.quick if quick else bench.full if full else bench.default) + list(overrides)
    t0 = time.time()
    data = build_data(load_config(bench.methods[methods[0]], common).data)
    grid_rows: list[dict[str, Any]] = []
    tuned_runs: dict[str, Path] = {}  # label -> its chosen grid run (= that label's seed-0 run: not trained twice)
    if tune and bench.grid:
        choices, grid_rows = _tune(bench, out_dir, common, data, methods)
        for label, key, _values in bench.grid:
            if label in choices:
                value = float(choices[label][0].split("=", 1)[1])
                tuned_runs[label] = out_dir / "tune" / f"{label}_{key.rsplit('.', 1)[-1]}={value:g}"
        how = "tuned now: best source-val score of the last checkpoint, seed 0, whole grid below"
    else:
        choices = {label: [kv] for label, kv in bench.chosen}
        how = "the recipe's values" if not choices else "chosen earlier by the same rule (docs/demo)"
    for label, other in bench.grid_from:
        if other in choices:
            choices[label] = choices[other]
    summaries, trained = [], []
    for seed in range(seeds):
        for method in methods:
            run_overrides = common + choices.get(method, []) + [f"train.seed={seed}", f"name={method}_seed{seed}"]
            run_dir = out_dir / "runs" / f"{method}_seed{seed}"
            if seed == 0 and method in tuned_runs:
                run_dir = tuned_runs[method]
            summary = _train_one(bench.methods[method], run_overrides, run_dir, data)
            summary["label"], summary["run_dir"] = method, str(run_dir)
            summaries.append(summary)
            trained.append((method, seed, run_dir, run_overrides))
    train_wall = time.time() - t0
    adaptations = []
    if adapt and bench.adapt_target is not None:
        extra = list(bench.adapt) + (list(bench.adapt_quick) if quick else [])
        for method, seed, run_dir, run_overrides in trained:
            over = run_overrides + extra + list(overrides)  # the caller's overrides win
            adaptations.append(_adapt_one(bench, method, seed, run_dir, over, out_dir, data))
    report = build_report(bench, summaries, out_dir, quick=quick, wall_s=time.time() - t0, settings=common,
                          grid=grid_rows, choices={k: v for k, v in choices.items() if k in methods},
                          choice_rule=how, adaptations=adaptations, train_wall_s=train_wall)  # fmt: skip
    return report


def _tune(
    bench: Benchmark, out_dir: Path, common: list[str], data: Any, methods: list[str]
) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """Train each grid point (seed 0) of the methods in use; choose per method on source-val only.

    Returns (label -> the chosen ``key=value`` overrides, one row per grid point)."""
    source_val, real = bench.sets[0], bench.sets[1:]
    wanted = {dict(bench.grid_from).get(m, m) for m in methods}
    choices: dict[str, list[str]] = {}
    rows: list[dict[str, Any]] = []
    for label, key, values in bench.grid:
        if label not in wanted:
            continue
        scores = []
        for value in values:
            name = f"{label}_{key.rsplit('.', 1)[-1]}={value:g}"
            run = common + ["train.seed=0", f"name=tune_{name}", f"{key}={value}"]
            last = _train_one(bench.methods[label], run, out_dir / "tune" / name, data)["selections"]["last"]
            metrics = last["metrics"]
            scores.append(metrics[source_val][bench.metric])
            rows.append({"method": label, "key": key, "value": value, "source_val": scores[-1],
                         "real": {s: metrics[s][bench.metric] for s in real if s in metrics}})  # fmt: skip
        best = max(range(len(values)), key=lambda i: (scores[i], -i))  # the first of equal scores
        choices[label] = [f"{key}={values[best]}"]
        for row in rows[-len(values) :]:
            row["chosen"] = row["value"] == values[best]
    return choices, rows


def _adapt_one(
    bench: Benchmark, method: str, seed: int, run_dir: Path, overrides: list[str], out_dir: Path, data: Any
) -> dict[str, Any]:
    """Adapt one trained run to ``bench.adapt_target`` (or read the finished adaptation)."""
    from asg.adapt import Adaptation

    folder = out_dir / "adapt" / f"{method}_seed{seed}"
    if not (folder / "done").exists():
        over = overrides + [f"model.init_from={run_dir}", f"adapt.target={bench.adapt_target}",
                            f"name=adapt_{method}_seed{seed}"]  # fmt: skip
        Adaptation(load_config(bench.methods[method], over), folder, data=data,
                   resume=(folder / "config.yaml").exists()).run()  # fmt: skip
    state = json.loads((folder / "adaptation.json").read_text())
    return {"method": method, "seed": seed, "folder": str(folder.relative_to(out_dir)), **state}


def build_report(
    bench: Benchmark,
    summaries: list[dict],
    out_dir: Path,
    quick: bool,
    wall_s: float,
    settings: list[str],
    grid: list[dict] | None = None,
    choices: dict[str, list[str]] | None = None,
    choice_rule: str = "",
    adaptations: list[dict] | None = None,
    train_wall_s: float | None = None,
) -> dict:
    """Aggregate a benchmark's run summaries (and tuning grid, adaptations) into report.json, report.md, plots."""
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
        folder = Path(s["run_dir"]) if "run_dir" in s else out_dir / "runs" / f"{s['label']}_seed{s['seed']}"
        hist = _read_history(folder / "results.jsonl")
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
            for rule in ("oracle", "source_val"):
                vals = [r[rule]["metrics"][set_name] for r in rows if r[rule] and set_name in r[rule]["metrics"]]
                if vals:
                    entry[f"{rule}_{set_name}"] = _mean_std(vals)
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
        "timing": runs_timing(summaries, train_wall_s if train_wall_s is not None else wall_s),
        "choices": choices or {},
        "choice_rule": choice_rule,
        "grid": grid or [],
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


def adaptation_table(bench: Benchmark, adaptations: list[dict]) -> dict[str, Any]:
    """Per starting method: mean ± std over seeds of each real set before and after adaptation, and of the last
    round's pseudo-label precision."""
    out: dict[str, Any] = {}
    for label in dict.fromkeys(a["method"] for a in adaptations):
        rows = [a for a in adaptations if a["method"] == label]
        entry: dict[str, Any] = {"seeds": len(rows)}
        for s in bench.sets[1:]:
            entry[f"before_{s}"] = _mean_std([a["start"]["metrics"][s][bench.metric] for a in rows])
            entry[f"after_{s}"] = _mean_std([a["rounds"][-1]["metrics"][s][bench.metric] for a in rows])
        precision = [a["rounds"][-1]["precision"]["precision"] for a in rows if a["rounds"][-1].get("precision")]
        if precision:
            entry["pseudo_precision"] = _mean_std(precision)
        out[label] = entry
    return out


def adaptation_markdown(bench: Benchmark, table: dict[str, Any]) -> str:
    real = bench.sets[1:]
    head = ["starting model", "seeds"] + [f"{s} {when}" for s in real for when in ("before", "after")]
    head.append("pseudo-label precision (last round)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in table.items():
        cells = [label, str(e["seeds"])] + [_fmt(e[f"{when}_{s}"]) for s in real for when in ("before", "after")]
        cells.append(_fmt(e.get("pseudo_precision")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _grid_markdown(bench: Benchmark, grid: list[dict]) -> str:
    real = bench.sets[1:]
    head = ["method", "setting", f"{bench.sets[0]} (source-val, used)"] + [f"{s} (not used)" for s in real]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in grid:
        mark = " **chosen**" if row.get("chosen") else ""
        cells = [row["method"], f"{row['key']}={row['value']:g}{mark}", f"{100 * row['source_val']:.1f}"]
        cells += [f"{100 * row['real'][s]:.1f}" if s in row["real"] else "–" for s in real]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _markdown(bench: Benchmark, report: dict) -> str:
    p = report["protocol"]
    real = bench.sets[1:]
    head = ["method"] + [f"{s} ({rule})" for s in real for rule in ("last", "source-val", "oracle")]
    oracle = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, e in report["table"].items():
        cells = [_fmt(e.get(key)) for s in real for key in (s, f"source_val_{s}", f"oracle_{s}")]
        oracle.append(f"| {label} | " + " | ".join(cells) + " |")
    extra = ""
    if report.get("choices") or report.get("grid"):
        chosen = ", ".join(f"{k}: `{' '.join(v)}`" for k, v in report["choices"].items()) or "recipe defaults"
        extra += f"\nHyper-parameters per method ({report['choice_rule']}): {chosen}.\n"
    if report.get("grid"):
        extra += (
            "\nTuning grid (seed 0, same length; each method's own parameter over three values, chosen on the "
            f"held-out synthetic split only):\n\n{_grid_markdown(bench, report['grid'])}\n"
        )
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
    return f"""# asg demo: {bench.title}

{bench.metric_label} (%) as mean ± std over seeds, **last checkpoint** (no early stopping), full
evaluation sets, tta_flip={p["tta_flip"]}. ImageNet retention: top-1 agreement (%) and KL(teacher ‖ model) of
the frozen ImageNet head against the frozen teacher on the real photos shipped with scikit-image and scikit-learn.
Wall time {report["wall_time_s"] / 60:.1f} min (training runs {train_min:.1f} min{_timing_words(report)});
settings: `{" ".join(p["settings"])}`.

{report["markdown_table"]}
{extra}
Checkpoint rules side by side: last (no early stopping), best source-val step (held-out synthetic split: a valid
protocol) and oracle (the best step chosen **with the real test labels**: an upper bound, not a valid protocol,
selected on {real[0]}); source-val and oracle evaluated {where}:

{chr(10).join(oracle)}

{plots}

Per-run details: `runs/<method>_seed<k>/summary.json` (every selection rule, labelled), `results.jsonl`
(one line per evaluation during training) and `report.md`.
"""


def runs_timing(summaries: list[dict], train_wall_s: float) -> dict[str, Any]:
    """Seconds per trainer phase summed over the runs trained now (a reused finished run counts its own), and the
    share of training steps in the training stage's wall time (building the data included)."""
    timings = [s["timing"] for s in summaries if s.get("timing")]
    if not timings:
        return {}
    phases = sorted({k for t in timings for k in t if k.endswith("_s") and k != "wall_s"})
    out: dict[str, Any] = {k: round(sum(t.get(k, 0.0) for t in timings), 1) for k in phases}
    out["runs"], out["steps"] = len(timings), sum(t.get("steps", 0) for t in timings)
    out["train_step_fraction"] = round(out["train_step_s"] / train_wall_s, 4) if train_wall_s > 0 else None
    return out


def _timing_words(report: dict) -> str:
    t = report.get("timing") or {}
    if not t.get("train_step_fraction") or not report.get("train_wall_time_s"):
        return ""
    return (f", of which training steps {100 * t['train_step_fraction']:.0f} %, evaluation "
            f"{100 * (t.get('eval_s', 0) + t.get('final_s', 0)) / report['train_wall_time_s']:.0f} %")  # fmt: skip


def _combined_markdown(reports: dict[str, dict], wall_s: float) -> str:
    parts = [f"# asg demo\n\nWall time {wall_s / 60:.1f} min for {len(reports)} benchmark(s).\n"]
    for name, r in reports.items():
        bench = BENCHMARKS[name]
        parts.append(f"## {bench.title}: {bench.metric_label} (%), last checkpoint\n\n{r['markdown_table']}\n\n"
                     f"Details, oracle rows and plots: [{name}/report.md]({name}/report.md)\n")  # fmt: skip
        if r.get("adaptation_markdown"):
            parts.append(f"Adaptation to {bench.adapt_target} (test halves before/after):\n\n"
                         f"{r['adaptation_markdown']}\n")  # fmt: skip
    return "\n".join(parts)
