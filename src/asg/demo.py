"""The embedded synthetic-to-real benchmarks behind ``asg demo``: digits (classification) and digit scenes
(segmentation).

Within a benchmark every method trains on the same synthetic data, with the same seeds and steps, and is
evaluated during training on the held-out synthetic split and the real sets. Finished runs are skipped and
interrupted ones resumed, so re-running the command continues where it stopped. Independent runs go to
``jobs`` worker processes side by side (``asg.sweep``).

One grid for every method (``--tune``, and ``--full``): each method is trained with seed 0 at every learning
rate of ``Benchmark.grid_lrs`` crossed with its own knob (ASG's lambda, LP-FT's probe length, feature guidance's
weight, L2-SP's alpha; ERM has none), and the point with the best **source-val** score of the last checkpoint
is chosen (no real label is used); WiSE-FT evaluates every fine-tuned ERM grid run at each alpha and is chosen
the same way. The report shows the whole grid. Without tuning, ``Benchmark.chosen`` holds the choices of the
grid run at the default length (docs/demo). Digits then adapts the ERM and ASG models to the unlabelled
adaptation half of MNIST-5k (``asg adapt``, the same self-training for every starting model) and reports the
test halves before and after.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asg.config import load_config
from asg.engine.checkpoint import atomic_write
from asg.engine.report import plot_curves, plot_per_class
from asg.engine.rundir import RunDir
from asg.errors import ConfigError
from asg.sweep import default_jobs, run_tasks, shared_data


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
    # one grid for every method: each label is trained at every learning rate of ``grid_lrs`` crossed with its
    # own knob (config key, values; key None: the rate alone); labels in grid_from take another label's choice
    grid_lrs: tuple[float, ...] = ()
    grid: tuple[tuple[str, str | None, tuple[float, ...]], ...] = ()
    grid_from: tuple[tuple[str, str], ...] = ()
    chosen: tuple[tuple[str, tuple[str, ...]], ...] = ()  # label -> overrides used when not tuning
    # WiSE-FT: the backbones of this label's runs interpolated towards the pretrained one, alpha chosen on source-val
    wise_ft_from: str | None = "erm"
    wise_ft_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    # segmentation: class groups reported beside the mIoU (name, class indices)
    class_groups: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # adaptation of every trained model to an unlabelled target set (None: no adaptation stage)
    adapt_target: str | None = None
    adapt_methods: tuple[str, ...] | None = None  # the starting models adapted (None: every trained label)
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
        "lp-ft": "digits_lpft",
        "wise-ft": "digits_erm",
        "feature": "digits_feature",
        "l2sp": "digits_l2sp",
        "asg+l2o": "digits_asg_l2o",
        "asg+random": "digits_asg_random",
    },
    default_methods=("erm", "asg", "lp-ft", "wise-ft", "feature", "asg+l2o"),  # --full: all
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
    grid_lrs=(0.01, 0.03, 0.1),
    grid=(
        ("erm", None, ()),
        ("asg", "method.kl_weight", (0.01, 0.1, 1.0)),
        ("lp-ft", "method.probe_steps", (25, 50, 75)),
        ("feature", "method.feature_weight", (0.1, 1.0, 10.0)),
        ("l2sp", "method.l2sp_alpha", (0.001, 0.01, 0.1)),
    ),
    grid_from=(("asg+l2o", "asg"), ("asg+random", "asg")),
    # chosen on source-val by `asg demo --benchmarks digits --tune --no-adapt --seeds 1
    # --methods erm,asg,lp-ft,wise-ft,feature,l2sp` at the default length (docs/demo/digits_grid/report.md)
    chosen=(
        ("erm", ("optim.lr=0.03",)),
        ("asg", ("optim.lr=0.03", "method.kl_weight=0.01")),
        ("lp-ft", ("optim.lr=0.03", "method.probe_steps=25")),
        ("feature", ("optim.lr=0.1", "method.feature_weight=1.0")),
        ("l2sp", ("optim.lr=0.1", "method.l2sp_alpha=0.1")),
        ("wise-ft", ("optim.lr=0.03",)),
    ),
    adapt_target="mnist5k_adapt",
    adapt_methods=("erm", "asg"),  # is a proxy-guided model a better start than plain fine-tuning?
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
    methods={
        "erm": "digit_scenes_erm",
        "asg": "digit_scenes_asg",
        "lp-ft": "digit_scenes_lpft",
        "wise-ft": "digit_scenes_erm",
        "feature": "digit_scenes_feature",
        "asg+l2o": "digit_scenes_asg_l2o",
    },
    default_methods=("erm", "asg", "lp-ft", "wise-ft", "feature"),
    default_seeds=3,
    sets=("synthetic", "mnist_photos"),
    default=("train.steps=400", "train.eval_every=100", "data.eval_max_per_set=200", "eval.full_eval_selected=false"),
    quick=(
        "train.steps=200",
        "train.eval_every=100",
        "data.num_train=800",
        "data.eval_max_per_set=100",
        "eval.full_eval_selected=false",
    ),  # fmt: skip
    full=("train.steps=1200", "train.eval_every=150", "data.eval_max_per_set=200", "eval.full_eval_selected=true"),
    grid_lrs=(0.02, 0.05),
    grid=(
        ("erm", None, ()),
        ("asg", "method.kl_weight", (0.1, 1.0)),
        ("lp-ft", "method.probe_steps", (50, 150)),
        ("feature", "method.feature_weight", (0.1, 1.0)),
    ),
    grid_from=(("asg+l2o", "asg"),),
    # chosen on source-val by `asg demo --benchmarks scenes --tune --seeds 1 --methods erm,asg,lp-ft,wise-ft,feature`
    # at the default length (docs/demo/scenes_grid/report.md)
    chosen=(
        ("erm", ("optim.lr=0.05",)),
        ("asg", ("optim.lr=0.05", "method.kl_weight=0.1")),
        ("lp-ft", ("optim.lr=0.05", "method.probe_steps=50")),
        ("feature", ("optim.lr=0.05", "method.feature_weight=0.1")),
        ("wise-ft", ("optim.lr=0.05",)),
    ),
    class_groups=(("digit", tuple(range(1, 11))), ("background", (0,))),
)
WISE_FT = "wise-ft"  # a demo label without training of its own (see Benchmark.wise_ft_from)
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (DIGITS, SCENES)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _train_one(recipe: str, overrides: list[str], out_dir: Path, quiet: bool = False) -> dict[str, Any]:
    """Train one run into ``out_dir`` (or read the finished one, or resume the interrupted one): its summary."""
    from asg.engine.trainer import Trainer

    if (out_dir / "done").exists():
        return json.loads((out_dir / "summary.json").read_text())
    resume = RunDir(out_dir).has_checkpoint()
    cfg = load_config(out_dir / "config.yaml" if resume else recipe, overrides)
    Trainer(cfg, out_dir, data=shared_data(cfg.data), resume=resume, quiet=quiet).run()
    return json.loads((out_dir / "summary.json").read_text())


def _train_all(tasks: list[tuple[str, list[str], Path]], jobs: int) -> list[dict[str, Any]]:
    """Every (recipe, overrides, folder) task trained (``jobs`` at a time): their summaries, in order; one line
    per finished run when the runs go to worker processes (their progress bars are off)."""
    if jobs <= 1:
        return [_train_one(*task) for task in tasks]
    todo = [t for t in tasks if not (t[2] / "done").exists()]
    if todo:
        print(f"asg demo: {len(todo)} runs, {min(jobs, len(todo))} at a time", flush=True)
    run_tasks(_train_one, [(*t, True) for t in todo], jobs)
    return [_train_one(*task) for task in tasks]  # all finished now: read back


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
    jobs: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate each benchmark's methods over ``seeds`` seeds; write report.md/report.json and plots.

    Each benchmark goes to ``out/<benchmark>/`` (its own report) and ``out/report.md`` gathers them. ``methods``
    picks labels present in a benchmark (others are skipped there); ``full`` runs every method, longer, after
    tuning each on its grid (``tune``, default: ``full``); ``adapt`` runs the adaptation stage where a benchmark
    has one. ``jobs``: runs trained side by side in worker processes (default ``asg.sweep.default_jobs``).
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
    first = BENCHMARKS[names[0]]
    device = load_config(first.methods[first.default_methods[0]], list(overrides)).train.device
    n_jobs = jobs if jobs is not None else default_jobs(device)
    with RunDir(out_dir):  # one demo per folder at a time
        t0 = time.time()
        reports = {}
        for name in names:
            bench = BENCHMARKS[name]
            chosen = [m for m in (methods or (bench.methods if full else bench.default_methods)) if m in bench.methods]
            if chosen:
                do_tune = full if tune is None else tune
                reports[name] = _run_benchmark(bench, out_dir / name, quick, full, seeds, chosen, overrides,
                                               do_tune, adapt, n_jobs)  # fmt: skip
        wall = time.time() - t0
        combined = {"wall_time_s": round(wall, 1), "benchmarks": reports, "out_dir": str(out_dir), "jobs": n_jobs}
        _write_report(out_dir / "report.md", _combined_markdown(reports, wall, n_jobs))
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
    jobs: int = 1,
) -> dict[str, Any]:
    seeds = seeds if seeds is not None else (1 if quick else bench.default_seeds if not full else 3)
    common = list(bench.quick if quick else bench.full if full else bench.default) + list(overrides)
    t0 = time.time()
    grid_rows: list[dict[str, Any]] = []
    tuned_runs: dict[str, Path] = {}  # label -> its chosen grid run (= that label's seed-0 run: not trained twice)
    if tune and bench.grid:
        choices, grid_rows, tuned_runs = _tune(bench, out_dir, common, methods, jobs)
        how = "tuned now: best source-val score of the last checkpoint, seed 0, whole grid below"
    else:
        choices = {label: list(kv) for label, kv in bench.chosen}
        how = "the recipe's values" if not choices else "chosen earlier by the same rule (docs/demo)"
    for label, other in bench.grid_from:
        if other in choices:
            choices[label] = choices[other]
    trained = []  # (label, seed, folder, overrides)
    for seed in range(seeds):
        for method in methods:
            if method == WISE_FT:
                continue
            run_overrides = common + choices.get(method, []) + [f"train.seed={seed}", f"name={method}_seed{seed}"]
            run_dir = out_dir / "runs" / f"{method}_seed{seed}"
            if seed == 0 and method in tuned_runs:
                run_dir = tuned_runs[method]
            trained.append((method, seed, run_dir, run_overrides))
    summaries = _train_all([(bench.methods[m], over, folder) for m, _, folder, over in trained], jobs)
    for (method, _seed, run_dir, _over), summary in zip(trained, summaries):
        summary["label"], summary["run_dir"] = method, str(run_dir)
    if WISE_FT in methods and bench.wise_ft_from is not None:
        summaries += _wise_ft_runs(bench, out_dir, common, choices, tuned_runs, seeds, jobs)
    train_wall = time.time() - t0
    adaptations = []
    if adapt and bench.adapt_target is not None:
        extra = list(bench.adapt) + (list(bench.adapt_quick) if quick else [])
        tasks = [(bench.methods[method], bench.adapt_target, method, seed, run_dir, run_overrides + extra +
                  list(overrides), out_dir, jobs > 1) for method, seed, run_dir, run_overrides in trained
                 if bench.adapt_methods is None or method in bench.adapt_methods]  # fmt: skip
        adaptations = run_tasks(_adapt_one, tasks, jobs)
    report = build_report(bench, summaries, out_dir, quick=quick, wall_s=time.time() - t0, settings=common,
                          grid=grid_rows, choices={k: v for k, v in choices.items() if k in methods},
                          choice_rule=how, adaptations=adaptations, train_wall_s=train_wall)  # fmt: skip
    return report


def _grid_name(label: str, lr: float, key: str | None, value: float | None) -> str:
    knob = f"_{key.rsplit('.', 1)[-1]}={value:g}" if key is not None else ""
    return f"{label}_lr={lr:g}{knob}"


def _tune(
    bench: Benchmark, out_dir: Path, common: list[str], methods: list[str], jobs: int = 1
) -> tuple[dict[str, list[str]], list[dict[str, Any]], dict[str, Path]]:
    """Train each grid point (seed 0) of the methods in use: every learning rate of ``bench.grid_lrs`` crossed
    with the method's own knob; choose per method on source-val only (the first of equal scores, in grid order).

    WiSE-FT adds no training: each of its source label's grid runs is evaluated at every alpha.
    Returns (label -> the chosen overrides, one row per grid point, label -> its chosen grid run)."""
    wanted = {dict(bench.grid_from).get(m, m) for m in methods}
    with_wise = WISE_FT in methods and bench.wise_ft_from is not None
    if with_wise:
        wanted.add(str(bench.wise_ft_from))
    points = []  # (label, lr, key, value, overrides, folder)
    for label, key, values in bench.grid:
        if label in wanted:
            for lr in bench.grid_lrs:
                for value in values if key is not None else (None,):
                    over = [f"optim.lr={lr}"] + ([f"{key}={value}"] if key is not None else [])
                    points.append((label, lr, key, value, over, out_dir / "tune" / _grid_name(label, lr, key, value)))
    summaries = _train_all([(bench.methods[label], common + ["train.seed=0", f"name=tune_{folder.name}", *over],
                             folder) for label, _, _, _, over, folder in points], jobs)  # fmt: skip
    wise_rows: dict[Path, list[dict[str, Any]]] = {}
    if with_wise:
        folders = [pt[5] for pt in points if pt[0] == bench.wise_ft_from]
        results = run_tasks(_wise_ft_eval, [(f, bench.wise_ft_alphas, None) for f in folders], jobs)
        for _label, lr, *_rest, folder in (pt for pt in points if pt[0] == bench.wise_ft_from):
            res = results[folders.index(folder)]
            wise_rows[folder] = [_grid_row(bench, WISE_FT, lr, "wise_ft_alpha", alpha, metrics, [f"optim.lr={lr}"])
                                 for alpha, metrics in res.items()]  # fmt: skip
    choices: dict[str, list[str]] = {}
    runs: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for label in dict.fromkeys(pt[0] for pt in points):
        label_rows = []
        for (lbl, lr, key, value, over, folder), summary in zip(points, summaries):
            if lbl == label:
                metrics = summary["selections"]["last"]["metrics"]
                label_rows.append(_grid_row(bench, label, lr, key, value, metrics, over) | {"folder": str(folder)})
        best = _choose(label_rows)
        choices[label], runs[label] = best["overrides"], Path(best["folder"])
        for row in label_rows:
            rows.append(row)
            rows += wise_rows.get(Path(row.pop("folder")), [])
    wise = [r for r in rows if r["method"] == WISE_FT]
    if wise:
        choices[WISE_FT] = [f"optim.lr={_choose(wise)['lr']}"]
    return choices, rows, runs


def _grid_row(bench: Benchmark, label: str, lr: float, key: str | None, value: float | None,
              metrics: dict[str, Any], over: list[str]) -> dict[str, Any]:  # fmt: skip
    source_val, real = bench.sets[0], bench.sets[1:]
    return {"method": label, "lr": lr, "key": key, "value": value, "overrides": over,
            "source_val": metrics[source_val][bench.metric],
            "real": {s: metrics[s][bench.metric] for s in real if s in metrics}}  # fmt: skip


def _choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the best source-val score (the first of equal scores); marks every row's ``chosen``."""
    best = max(range(len(rows)), key=lambda i: (rows[i]["source_val"], -i))
    for i, row in enumerate(rows):
        row["chosen"] = i == best
    return rows[best]


def _wise_ft_eval(
    folder: Path, alphas: tuple[float, ...], sets: list[str] | None
) -> dict[float, dict[str, dict[str, Any]]]:
    """``asg.api.evaluate_wise_ft`` of a finished run's last weights, without the confusion matrices."""
    from asg.api import evaluate_wise_ft

    results = evaluate_wise_ft(folder, alphas, sets=sets)
    return {a: {k: {m: v for m, v in r.items() if m != "confusion"} for k, r in res.items()}
            for a, res in results.items()}  # fmt: skip


def _wise_ft_one(folder: Path, alphas: tuple[float, ...], source_val: str, metric: str) -> dict[str, Any]:
    """WiSE-FT of one fine-tuned run: alpha chosen on ``source_val``, then evaluated on every set; kept in
    ``<folder>/wise_ft.json`` (read back when present)."""
    from asg.methods.wise_ft import choose_alpha

    cached = folder / "wise_ft.json"
    if cached.exists():
        return json.loads(cached.read_text())
    source = _wise_ft_eval(folder, alphas, [source_val])
    alpha = choose_alpha({a: m[source_val][metric] for a, m in source.items()})
    result = {"alpha": alpha, "source_val": {str(a): m[source_val][metric] for a, m in source.items()},
              "metrics": _wise_ft_eval(folder, (alpha,), None)[alpha]}  # fmt: skip
    atomic_write(cached, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    return result


def _wise_ft_runs(
    bench: Benchmark,
    out_dir: Path,
    common: list[str],
    choices: dict[str, list[str]],
    tuned_runs: dict[str, Path],
    seeds: int,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """WiSE-FT rows: per seed, the fine-tuned run of ``bench.wise_ft_from`` at WiSE-FT's chosen rate (that
    label's own run when the rates agree, else trained here) with its backbone interpolated towards the
    pretrained one; alpha chosen on source-val per run, the chosen alpha evaluated on every set.

    Returns run summaries shaped like the trainer's (selection "last", ``wise_ft_alpha`` recorded)."""
    base = str(bench.wise_ft_from)
    own = choices.get(WISE_FT, choices.get(base, []))
    same = own == choices.get(base, [])
    tasks = []
    for seed in range(seeds):
        name = f"{base if same else WISE_FT + '-base'}_seed{seed}"
        folder = out_dir / "runs" / name
        if seed == 0 and same and base in tuned_runs:
            folder = tuned_runs[base]
        elif seed == 0 and own:  # WiSE-FT's own rate: its grid run is ERM's run at that rate
            grid_dir = out_dir / "tune" / _grid_name(base, float(own[0].split("=", 1)[1]), None, None)
            folder = grid_dir if (grid_dir / "done").exists() else folder
        tasks.append((bench.methods[base], common + own + [f"train.seed={seed}", f"name={name}"], folder))
    summaries = _train_all(tasks, jobs)
    results = run_tasks(_wise_ft_one, [(t[2], bench.wise_ft_alphas, bench.sets[0], bench.metric) for t in tasks],
                        jobs)  # fmt: skip
    out = []
    for seed, (summary, result) in enumerate(zip(summaries, results)):
        last = {"step": summary["selections"]["last"]["step"], "tta_flip": False, "metrics": result["metrics"],
                "wise_ft_alpha": result["alpha"]}  # fmt: skip
        out.append({"label": WISE_FT, "seed": seed, "class_names": summary["class_names"], "wise_ft": result,
                    "selections": {"last": last}, "timing": None})  # fmt: skip
    return out


def _adapt_one(
    recipe: str,
    target: str,
    method: str,
    seed: int,
    run_dir: Path,
    overrides: list[str],
    out_dir: Path,
    quiet: bool = False,
) -> dict[str, Any]:
    """Adapt one trained run to the target set ``target`` (or read the finished adaptation)."""
    from asg.adapt import Adaptation

    folder = out_dir / "adapt" / f"{method}_seed{seed}"
    if not (folder / "done").exists():
        over = overrides + [f"model.init_from={run_dir}", f"adapt.target={target}", f"name=adapt_{method}_seed{seed}"]
        cfg = load_config(recipe, over)
        Adaptation(cfg, folder, data=shared_data(cfg.data), resume=(folder / "config.yaml").exists(),
                   quiet=quiet).run()  # fmt: skip
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
            k: {key: val for key, val in v.items() if not key.startswith("per_class")} | group_means(bench, v)
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
                curves.setdefault(s["label"], {}).setdefault(set_name, {}).setdefault(row["step"], []).append(m[metric])
    table = {}
    for label in labels:
        rows = [r for r in runs if r["method"] == label]
        entry: dict[str, Any] = {}
        for set_name in bench.sets:
            vals = [r["metrics"][set_name][metric] for r in rows if set_name in r["metrics"]]
            if vals:
                entry[set_name] = _mean_std(vals)
            for group, _ in bench.class_groups:
                vals = [r["metrics"][set_name][f"{group}_iou"] for r in rows if set_name in r["metrics"]]
                if vals:
                    entry[f"{set_name}_{group}_iou"] = _mean_std(vals)
        alphas = [r["wise_ft_alpha"] for r in rows if r.get("wise_ft_alpha") is not None]
        if alphas:
            entry["wise_ft_alpha"] = alphas
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
            {label: mean_curves[label].get(set_name, []) for label in labels if label in mean_curves},
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
    _write_report(out_dir / "report.json", json.dumps(report, indent=1))
    _write_report(out_dir / "report.md", _markdown(bench, report))
    report["out_dir"] = str(out_dir)
    return report


def _write_report(path: Path, text: str) -> None:
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


def _fmt(ms: tuple[float, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if ms is None:
        return "–"
    return f"{scale * ms[0]:.{digits}f} ± {scale * ms[1]:.{digits}f}"


def group_means(bench: Benchmark, metrics: dict[str, Any]) -> dict[str, float]:
    """``{"<group>_iou": mean IoU over the group's classes present in the set}`` for ``bench.class_groups``."""
    per_class = metrics.get(bench.per_class_key)
    if not bench.class_groups or per_class is None:
        return {}
    out = {}
    for group, classes in bench.class_groups:
        vals = [per_class[c] for c in classes if per_class[c] is not None]
        out[f"{group}_iou"] = float(np.mean(vals)) if vals else float("nan")
    return out


def markdown_table(bench: Benchmark, table: dict) -> str:
    columns = []  # (header, key)
    for i, s in enumerate(bench.sets):
        name = f"{s} (held-out)" if i == 0 else s
        columns.append((f"{name} {bench.metric_label}" if bench.class_groups else name, s))
        columns += [(f"{s} {group} IoU", f"{s}_{group}_iou") for group, _ in bench.class_groups]
    header = ["method", "seeds", *(h for h, _ in columns), "ImageNet top-1 agreement", "ImageNet KL"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, e in table.items():
        alphas = e.get("wise_ft_alpha")
        name = f"{label} (α {', '.join(f'{a:g}' for a in alphas)})" if alphas else label  # per seed, from source-val
        cells = [name, str(e["seeds"]), *(_fmt(e.get(key)) for _, key in columns)]
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
    head = ["method", "optim.lr", "own knob", f"{bench.sets[0]} (source-val, used)"] + [f"{s} (not used)" for s in real]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in grid:
        mark = " **chosen**" if row.get("chosen") else ""
        knob = f"{row['key']}={row['value']:g}" if row.get("key") else "–"
        cells = [row["method"] + mark, f"{row['lr']:g}", knob, f"{100 * row['source_val']:.1f}"]
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
            f"\nTuning grid (seed 0, same length; every method at the learning rates {list(bench.grid_lrs)} crossed "
            "with its own knob; WiSE-FT evaluates each fine-tuned ERM run at every alpha; chosen on the held-out "
            f"synthetic split only):\n\n{_grid_markdown(bench, report['grid'])}\n"
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
    evaluation = t.get("eval_s", 0) + t.get("final_s", 0)
    return (f"; the {t['runs']} runs of the table spent {t['train_step_s'] / 60:.1f} min in training steps and "
            f"{evaluation / 60:.1f} min in evaluation, summed over runs, which overlap when several run at a "
            "time")  # fmt: skip


def _combined_markdown(reports: dict[str, dict], wall_s: float, jobs: int = 1) -> str:
    parts = [f"# asg demo\n\nWall time {wall_s / 60:.1f} min for {len(reports)} benchmark(s), {jobs} run(s) at a "
             "time.\n"]  # fmt: skip
    for name, r in reports.items():
        bench = BENCHMARKS[name]
        parts.append(f"## {bench.title}: {bench.metric_label} (%), last checkpoint\n\n{r['markdown_table']}\n\n"
                     f"Details, oracle rows and plots: [{name}/report.md]({name}/report.md)\n")  # fmt: skip
        if r.get("adaptation_markdown"):
            parts.append(f"Adaptation to {bench.adapt_target} (test halves before/after):\n\n"
                         f"{r['adaptation_markdown']}\n")  # fmt: skip
    return "\n".join(parts)
