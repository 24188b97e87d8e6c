"""The demo's tuning: one Optuna study per trained label (``asg.tuning``), every study on the same budget,
sampler and pruner, at the length of the run it tunes, chosen on source-val only; and WiSE-FT's rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asg.demo.benchmarks import WISE_FT, Benchmark
from asg.demo.runs import train_all, wise_ft_one
from asg.engine.rundir.folder import RunDir
from asg.tuning.launch import run_workers
from asg.tuning.results import summary as study_summary
from asg.tuning.spec import SweepSpec
from asg.tuning.study import Study
from asg.workers import run_tasks


def study_spec(bench: Benchmark, label: str, out_dir: Path, common: list[str]) -> SweepSpec:
    """The study that tunes ``label`` of ``bench`` with the overrides ``common`` (length, data), seed 0."""
    steps = next((o.split("=", 1)[1] for o in reversed(common) if o.startswith("train.steps=")), "recipe")
    return SweepSpec(
        bench.methods[label],
        out_dir / "tune" / label,
        [*common, "train.seed=0", "train.progress=false"],
        trials=bench.tune_trials,
        sampler=bench.tune_sampler,
        seed=0,
        pruner="asha",
        study_name=f"{bench.name}-{label}-{steps}",
        ranges={"optim.lr": bench.lr_range},
    )


def tuned_labels(bench: Benchmark, methods: list[str]) -> list[str]:
    """The labels with a study of their own among ``methods`` (and the labels they lend their choice to)."""
    follow = dict(bench.grid_from)
    wanted = dict.fromkeys(follow.get(m, m) for m in methods)
    return [label for label in wanted if label in bench.methods and label not in follow]


def tune_methods(
    bench: Benchmark, out_dir: Path, common: list[str], methods: list[str], jobs: int = 1
) -> tuple[dict[str, list[str]], list[dict[str, Any]], dict[str, Path], dict[str, dict[str, Any]]]:
    """Run (or read back) each label's study, ``jobs`` workers at a time; choose its best complete trial.

    Returns (label -> the chosen overrides, one row per trial, label -> the chosen trial's run folder,
    label -> what its study cost)."""
    choices: dict[str, list[str]] = {}
    runs: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    costs: dict[str, dict[str, Any]] = {}
    for label in tuned_labels(bench, methods):
        spec = study_spec(bench, label, out_dir, common)
        run_workers(spec, jobs)
        result = study_summary(Study(spec))
        best = result["best"]
        costs[label] = {**result["cost"], "rule": result["rule"], "study": result["study"]}
        for row in result["rows"]:
            rows.append(
                {
                    "method": label,
                    **row,
                    "real": _real_scores(bench, row),
                    "chosen": best is not None and row["trial"] == best["trial"],
                }
            )
        if best is not None:
            choices[label], runs[label] = list(best["overrides"]), Path(best["folder"])
    return choices, rows, runs, costs


def _real_scores(bench: Benchmark, row: dict[str, Any]) -> dict[str, float]:
    """The real sets' scores of a trial's last evaluation (shown, never used to choose)."""
    folder = row.get("folder")
    if not folder or not Path(folder, "results.jsonl").exists():
        return {}
    last = RunDir(Path(folder)).read_rows()[-1]["metrics"]
    return {s: last[s][bench.metric] for s in bench.sets[1:] if s in last}


def wise_ft_runs(
    bench: Benchmark,
    out_dir: Path,
    common: list[str],
    choices: dict[str, list[str]],
    tuned_runs: dict[str, Path],
    seeds: int,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """WiSE-FT rows: per seed, the fine-tuned run of ``bench.wise_ft_from`` at WiSE-FT's chosen rate (that
    label's own run when the choices agree, else trained here) with its backbone interpolated towards the
    pretrained one; alpha chosen on source-val per run, the chosen alpha evaluated on every set.

    Returns run summaries shaped like the trainer's (selection "last", ``wise_ft_alpha`` recorded)."""
    base = str(bench.wise_ft_from)
    own = choices.get(WISE_FT, choices.get(base, []))
    same = own == choices.get(base, [])
    tasks = []
    for seed in range(seeds):
        name = f"{base if same else WISE_FT + '-base'}_seed{seed}"
        folder = tuned_runs[base] if seed == 0 and same and base in tuned_runs else out_dir / "runs" / name
        tasks.append((bench.methods[base], common + own + [f"train.seed={seed}", f"name={name}"], folder))
    summaries = train_all(tasks, jobs)
    results = run_tasks(wise_ft_one, [(t[2], bench.wise_ft_alphas, bench.sets[0], bench.metric) for t in tasks], jobs)
    out = []
    for seed, (summary, result) in enumerate(zip(summaries, results)):
        last = {
            "step": summary.selections["last"].step,
            "tta_flip": False,
            "metrics": result["metrics"],
            "wise_ft_alpha": result["alpha"],
        }
        out.append(
            {
                "label": WISE_FT,
                "seed": seed,
                "class_names": summary.class_names,
                "wise_ft": result,
                "selections": {"last": last},
                "timing": None,
            }
        )
    return out
