"""The embedded synthetic-to-real benchmarks behind ``asg demo``: digits (classification) and digit scenes
(segmentation).

Within a benchmark every method trains on the same synthetic data, with the same seeds and steps, and is
evaluated during training on the held-out synthetic split and the real sets. Finished runs are skipped and
interrupted ones resumed, so re-running the command continues where it stopped. Independent runs go to
``jobs`` worker processes side by side (``asg.workers``).

Tuning (``--tune``, and ``--full``): one Optuna study per method (``asg.tuning``) at the length of the runs it
tunes, every study with the same budget, sampler and ASHA pruner, each trial drawing the head's rate, the
backbone's multiple of it and the method's own knob (ASG's lambda, LP-FT's probe length, feature guidance's
weight, L2-SP's alpha; ERM none); a method's choice is its complete trial with the best **source-val** score (no
real label is used), and that trial is its seed-0 run. WiSE-FT takes ERM's choice. The report shows every trial
and what the pruner saved. Without tuning, ``Benchmark.chosen`` holds the choices of a study at the default
length (docs/demo). Digits then adapts the ERM and ASG models to the unlabelled
adaptation half of MNIST-5k (``asg adapt``, the same self-training for every starting model) and reports the
test halves before and after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from asg.demo.backbone_rate import backbone_rate_runs
from asg.demo.benchmarks import BENCHMARKS, DIGITS, SCENES, WISE_FT, Benchmark
from asg.demo.report import build_report, combined_markdown, write_report
from asg.demo.runs import adapt_one, train_all
from asg.demo.tuning import tune_methods, wise_ft_runs
from asg.engine.rundir.folder import RunDir
from asg.engine.rundir.summary import RunSummary
from asg.errors import ConfigError
from asg.registries import load_checked_config
from asg.workers import default_jobs, run_tasks, worker_pool

__all__ = ["BENCHMARKS", "DIGITS", "SCENES", "WISE_FT", "Benchmark", "build_report", "run_demo"]


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
    backbone_rates: bool = False,
) -> dict[str, Any]:
    """Train and evaluate each benchmark's methods over ``seeds`` seeds; write report.md/report.json and plots.

    Each benchmark goes to ``out/<benchmark>/`` (its own report) and ``out/report.md`` gathers them. ``methods``
    picks labels present in a benchmark (others are skipped there); ``full`` runs every method, longer, after
    tuning each on its grid (``tune``, default: ``full``); ``adapt`` runs the adaptation stage where a benchmark
    has one. ``jobs``: runs trained side by side in worker processes (default ``asg.workers.default_jobs``).
    ``backbone_rates``: also train ERM and ASG at their chosen point with only the backbone rate changed
    (``asg.demo.backbone_rate``).
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
    device = load_checked_config(first.methods[first.default_methods[0]], list(overrides)).train.device
    n_jobs = jobs if jobs is not None else default_jobs(device)
    with RunDir(out_dir), worker_pool(n_jobs):  # one demo per folder at a time; one pool for all its runs
        t0 = time.time()
        reports = {}
        do_tune = full if tune is None else tune
        picked = {
            n: [
                m
                for m in (methods or (BENCHMARKS[n].methods if full else BENCHMARKS[n].default_methods))
                if m in BENCHMARKS[n].methods
            ]
            for n in names
        }
        shared_train_s = None  # wall time of the one queue that trained every benchmark's runs
        # every benchmark's runs in one queue, longest first (no worker idles at a benchmark's end), then seed by
        # seed (an interrupted demo has whole seeds of every benchmark)
        if not do_tune and n_jobs > 1:
            queue = []
            for n in names:
                bench = BENCHMARKS[n]
                common, n_seeds = _common(bench, quick, full, overrides), _seeds(bench, quick, full, seeds)
                queue += _training_tasks(bench, out_dir / n, common, n_seeds, picked[n], _fixed_choices(bench))
            queue.sort(key=lambda task: (-load_checked_config(task.recipe, task.overrides).train.steps, task.seed))
            if not all(RunDir(task.folder).is_done() for task in queue):  # else each benchmark reads its runs back
                train_all([(task.recipe, task.overrides, task.folder) for task in queue], n_jobs)
                shared_train_s = time.time() - t0
        for name in names:
            if picked[name]:
                reports[name] = _run_benchmark(
                    BENCHMARKS[name],
                    out_dir / name,
                    quick,
                    full,
                    seeds,
                    picked[name],
                    overrides,
                    do_tune,
                    adapt,
                    n_jobs,
                    shared_train_s,
                    backbone_rates,
                )
        wall = time.time() - t0
        combined = {"wall_time_s": round(wall, 1), "benchmarks": reports, "out_dir": str(out_dir), "jobs": n_jobs}
        write_report(out_dir / "report.md", combined_markdown(reports, wall, n_jobs))
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
    shared_train_s: float | None = None,
    backbone_rates: bool = False,
) -> dict[str, Any]:
    seeds = _seeds(bench, quick, full, seeds)
    common = _common(bench, quick, full, overrides)
    t0 = time.time()
    grid_rows: list[dict[str, Any]] = []
    costs: dict[str, dict[str, Any]] = {}
    tuned_runs: dict[str, Path] = {}  # label -> its chosen trial's run (= that label's seed-0 run: not trained twice)
    if tune:
        choices, grid_rows, tuned_runs, costs = tune_methods(bench, out_dir, common, methods, jobs)
        choices = _inherit_choices(bench, choices)
        how = (
            f"tuned now: one Optuna study per method, {bench.tune_trials} trials each ({bench.tune_sampler} "
            "sampler, ASHA), best last source-val score of a complete trial, seed 0; every trial below"
        )
    else:
        choices = _fixed_choices(bench)
        how = "the recipe's values" if not bench.chosen else "chosen earlier by the same rule (docs/demo)"
    tasks = _training_tasks(bench, out_dir, common, seeds, methods, choices, tuned_runs)
    summaries = train_all([(t.recipe, t.overrides, t.folder) for t in tasks], jobs)
    wide = _wide_labels(bench, tasks, summaries) if full and tune else []
    if wide:  # a spread over 3 points on the first real set: 5 seeds, not 3
        more = [t for t in _training_tasks(bench, out_dir, common, MORE_SEEDS, wide, choices) if t.seed >= seeds]
        print(f"asg demo: {', '.join(wide)}: seed std over {100 * WIDE_STD:g} points; seeds up to {MORE_SEEDS}")
        tasks += more
        summaries += train_all([(t.recipe, t.overrides, t.folder) for t in more], jobs)
    rows = [{**s.to_dict(), "label": t.label, "run_dir": str(t.folder)} for t, s in zip(tasks, summaries)]
    if WISE_FT in methods and bench.wise_ft_from is not None:
        rows += wise_ft_runs(bench, out_dir, common, choices, tuned_runs, seeds, jobs)
    train_wall = time.time() - t0
    adaptations = []
    if adapt and bench.adapt_target is not None:
        extra = list(bench.adapt) + list(bench.adapt_quick if quick else bench.adapt_full if full else ())
        adapt_tasks = [
            (
                t.recipe,
                bench.adapt_target,
                t.label,
                t.seed,
                t.folder,
                t.overrides + extra + list(overrides),
                out_dir,
                jobs > 1,
            )
            for t in tasks
            if bench.adapt_methods is None or t.label in bench.adapt_methods
        ]
        adaptations = run_tasks(adapt_one, adapt_tasks, jobs)
    rates = None
    if backbone_rates:
        labels = tuple(label for label in ("erm", "asg") if label in bench.methods)
        rates = backbone_rate_runs(bench, out_dir, common, choices, labels, seeds=seeds, jobs=jobs)
    report = build_report(
        bench,
        rows,
        out_dir,
        quick=quick,
        wall_s=time.time() - t0,
        settings=common,
        grid=grid_rows,
        tuning_cost=costs,
        choices={k: v for k, v in choices.items() if k in methods},
        choice_rule=how,
        adaptations=adaptations,
        train_wall_s=train_wall,
        shared_train_s=shared_train_s,
        backbone_rate=rates,
    )
    return report


WIDE_STD, MORE_SEEDS = 0.03, 5  # the tuned long protocol: 5 seeds where 3 spread over 3 points


def _wide_labels(bench: Benchmark, tasks: list[TrainingTask], summaries: list[RunSummary]) -> list[str]:
    """The labels whose last-checkpoint score on the first real set has a seed std above ``WIDE_STD``."""
    real = bench.sets[1]
    scores: dict[str, list[float]] = {}
    for task, summary in zip(tasks, summaries):
        scores.setdefault(task.label, []).append(summary.selections["last"].metrics[real][bench.metric])
    return [label for label, v in scores.items() if len(v) > 1 and float(np.std(v, ddof=1)) > WIDE_STD]


class TrainingTask(NamedTuple):
    """One run of a benchmark's table: its label, seed, recipe, overrides and folder."""

    label: str
    seed: int
    recipe: str
    overrides: list[str]
    folder: Path


def _seeds(bench: Benchmark, quick: bool, full: bool, seeds: int | None) -> int:
    return seeds if seeds is not None else (1 if quick else bench.default_seeds if not full else 3)


def _common(bench: Benchmark, quick: bool, full: bool, overrides: list[str] | tuple[str, ...]) -> list[str]:
    return list(bench.quick if quick else bench.full if full else bench.default) + list(overrides)


def _fixed_choices(bench: Benchmark) -> dict[str, list[str]]:
    """Each label's overrides when not tuning: ``bench.chosen``, with the ``grid_from`` labels filled in."""
    return _inherit_choices(bench, {label: list(kv) for label, kv in bench.chosen})


def _inherit_choices(bench: Benchmark, choices: dict[str, list[str]]) -> dict[str, list[str]]:
    """``choices`` (label -> overrides) with each ``grid_from`` label given the choice of the label it follows."""
    choices = dict(choices)
    for label, other in bench.grid_from:
        if other in choices:
            choices[label] = choices[other]
    return choices


def _training_tasks(
    bench: Benchmark,
    out_dir: Path,
    common: list[str],
    seeds: int,
    methods: list[str],
    choices: dict[str, list[str]],
    tuned_runs: dict[str, Path] | None = None,
) -> list[TrainingTask]:
    """The runs of the benchmark's table, seed by seed (WiSE-FT trains none of its own); a tuned label's seed 0 is
    its chosen grid run. ``common``: the overrides of every run of the benchmark."""
    tasks = []
    for seed in range(seeds):
        for method in methods:
            if method == WISE_FT:
                continue
            run_overrides = common + choices.get(method, []) + [f"train.seed={seed}", f"name={method}_seed{seed}"]
            folder = (tuned_runs or {}).get(method) if seed == 0 else None
            folder = folder or out_dir / "runs" / f"{method}_seed{seed}"
            tasks.append(TrainingTask(method, seed, bench.methods[method], run_overrides, folder))
    return tasks
