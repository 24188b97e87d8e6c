"""The demo's unit jobs: train one run, adapt one run, evaluate one run's WiSE-FT interpolations; each reads a
finished folder back instead of redoing it, so an interrupted demo continues where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from asg.adapt import Adaptation
from asg.api import evaluate_wise_ft
from asg.engine.rundir.folder import RunDir
from asg.engine.rundir.init_from import ADAPTATION_FILE
from asg.engine.rundir.summary import RunSummary
from asg.engine.trainer import Trainer
from asg.io import atomic_write
from asg.l2o import build_controller
from asg.methods.wise_ft import choose_alpha
from asg.registries import check_registry_names, load_checked_config
from asg.workers import run_tasks, shared_data


def train_one(recipe: str, overrides: list[str], out_dir: Path, quiet: bool = False) -> RunSummary:
    """Train one run into ``out_dir`` (or read the finished one, or resume the interrupted one): its summary."""
    rd = RunDir(out_dir)
    if not rd.is_done():
        resume = rd.has_progress()
        cfg = check_registry_names(rd.read_config(overrides)) if resume else load_checked_config(recipe, overrides)
        Trainer(
            cfg, out_dir, data=shared_data(cfg.data), resume=resume, quiet=quiet, controller_factory=build_controller
        ).fit()
    summary = rd.read_summary()
    assert summary is not None, f"{out_dir} finished without summary.json"
    return summary


def train_all(tasks: list[tuple[str, list[str], Path]], jobs: int) -> list[RunSummary]:
    """Every (recipe, overrides, folder) task trained (``jobs`` at a time): their summaries, in order; one line
    per finished run when the runs go to worker processes (their progress bars are off)."""
    if jobs <= 1:
        return [train_one(*task) for task in tasks]
    todo = [t for t in tasks if not RunDir(t[2]).is_done()]
    if todo:
        print(f"asg demo: {len(todo)} runs, {min(jobs, len(todo))} at a time", flush=True)
    run_tasks(train_one, [(*t, True) for t in todo], jobs)
    return [train_one(*task) for task in tasks]  # all finished now: read back


def wise_ft_eval(
    folder: Path, alphas: tuple[float, ...], sets: list[str] | None
) -> dict[float, dict[str, dict[str, Any]]]:
    """``asg.api.evaluate_wise_ft`` of a finished run's last weights, without the confusion matrices."""
    results = evaluate_wise_ft(folder, alphas, sets=sets)
    return {
        a: {k: {m: v for m, v in r.items() if m != "confusion"} for k, r in res.items()} for a, res in results.items()
    }


def wise_ft_one(folder: Path, alphas: tuple[float, ...], source_val: str, metric: str) -> dict[str, Any]:
    """WiSE-FT of one fine-tuned run: alpha chosen on ``source_val``, then evaluated on every set; kept in
    ``<folder>/wise_ft.json`` (read back when present)."""
    cached = folder / "wise_ft.json"
    done = RunDir(folder).read_json(cached.name)
    if done is not None:
        return done
    source = wise_ft_eval(folder, alphas, [source_val])
    alpha = choose_alpha({a: m[source_val][metric] for a, m in source.items()})
    result = {
        "alpha": alpha,
        "source_val": {str(a): m[source_val][metric] for a, m in source.items()},
        "metrics": wise_ft_eval(folder, (alpha,), None)[alpha],
    }
    atomic_write(cached, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    return result


def adapt_one(
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
    folder = out_dir / "adapt" / f"{method}_seed{seed}"
    rd = RunDir(folder)
    if not rd.is_done():
        over = overrides + [f"model.init_from={run_dir}", f"adapt.target={target}", f"name=adapt_{method}_seed{seed}"]
        cfg = load_checked_config(recipe, over)
        Adaptation(cfg, folder, data=shared_data(cfg.data), resume=True, quiet=quiet).run()  # continues or starts
    state = rd.read_json(ADAPTATION_FILE)
    return {"method": method, "seed": seed, "folder": str(folder.relative_to(out_dir)), **state}
