"""One grid for every method: each label at every learning rate of ``Benchmark.grid_lrs`` crossed with its own
knob, chosen on source-val only; WiSE-FT's alpha on the fine-tuned ERM runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asg.demo.benchmarks import WISE_FT, Benchmark
from asg.demo.runs import train_all, wise_ft_eval, wise_ft_one
from asg.engine.rundir import RunDir
from asg.sweep import run_tasks


def grid_name(label: str, lr: float, key: str | None, value: float | None) -> str:
    knob = f"_{key.rsplit('.', 1)[-1]}={value:g}" if key is not None else ""
    return f"{label}_lr={lr:g}{knob}"


def tune_grid(
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
                    points.append((label, lr, key, value, over, out_dir / "tune" / grid_name(label, lr, key, value)))
    summaries = train_all([(bench.methods[label], common + ["train.seed=0", f"name=tune_{folder.name}", *over],
                             folder) for label, _, _, _, over, folder in points], jobs)  # fmt: skip
    wise_rows: dict[Path, list[dict[str, Any]]] = {}
    if with_wise:
        folders = [pt[5] for pt in points if pt[0] == bench.wise_ft_from]
        results = run_tasks(wise_ft_eval, [(f, bench.wise_ft_alphas, None) for f in folders], jobs)
        for _label, lr, *_rest, folder in (pt for pt in points if pt[0] == bench.wise_ft_from):
            res = results[folders.index(folder)]
            wise_rows[folder] = [grid_row(bench, WISE_FT, lr, "wise_ft_alpha", alpha, metrics, [f"optim.lr={lr}"])
                                 for alpha, metrics in res.items()]  # fmt: skip
    choices: dict[str, list[str]] = {}
    runs: dict[str, Path] = {}
    rows: list[dict[str, Any]] = []
    for label in dict.fromkeys(pt[0] for pt in points):
        label_rows = []
        for (lbl, lr, key, value, over, folder), summary in zip(points, summaries):
            if lbl == label:
                metrics = summary["selections"]["last"]["metrics"]
                label_rows.append(grid_row(bench, label, lr, key, value, metrics, over) | {"folder": str(folder)})
        best = choose(label_rows)
        choices[label], runs[label] = best["overrides"], Path(best["folder"])
        for row in label_rows:
            rows.append(row)
            rows += wise_rows.get(Path(row.pop("folder")), [])
    wise = [r for r in rows if r["method"] == WISE_FT]
    if wise:
        choices[WISE_FT] = [f"optim.lr={choose(wise)['lr']}"]
    return choices, rows, runs


def grid_row(bench: Benchmark, label: str, lr: float, key: str | None, value: float | None,
              metrics: dict[str, Any], over: list[str]) -> dict[str, Any]:  # fmt: skip
    source_val, real = bench.sets[0], bench.sets[1:]
    return {"method": label, "lr": lr, "key": key, "value": value, "overrides": over,
            "source_val": metrics[source_val][bench.metric],
            "real": {s: metrics[s][bench.metric] for s in real if s in metrics}}  # fmt: skip


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the best source-val score (the first of equal scores); marks every row's ``chosen``."""
    best = max(range(len(rows)), key=lambda i: (rows[i]["source_val"], -i))
    for i, row in enumerate(rows):
        row["chosen"] = i == best
    return rows[best]


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
            grid_dir = out_dir / "tune" / grid_name(base, float(own[0].split("=", 1)[1]), None, None)
            folder = grid_dir if RunDir(grid_dir).is_done() else folder
        tasks.append((bench.methods[base], common + own + [f"train.seed={seed}", f"name={name}"], folder))
    summaries = train_all(tasks, jobs)
    results = run_tasks(wise_ft_one, [(t[2], bench.wise_ft_alphas, bench.sets[0], bench.metric) for t in tasks],
                        jobs)  # fmt: skip
    out = []
    for seed, (summary, result) in enumerate(zip(summaries, results)):
        last = {"step": summary["selections"]["last"]["step"], "tta_flip": False, "metrics": result["metrics"],
                "wise_ft_alpha": result["alpha"]}  # fmt: skip
        out.append({"label": WISE_FT, "seed": seed, "class_names": summary["class_names"], "wise_ft": result,
                    "selections": {"last": last}, "timing": None})  # fmt: skip
    return out
