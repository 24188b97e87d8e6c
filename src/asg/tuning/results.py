"""A study read back: one row per trial, the best complete trial, and what the pruner saved."""

from __future__ import annotations

from typing import Any

from optuna.trial import TrialState

from asg.tuning.space import grid_size
from asg.tuning.study import Study


def trial_rows(study: Study) -> list[dict[str, Any]]:
    """Every trial that used the budget: number, state, parameters, steps trained, last source-val, how it ended."""
    rows = []
    for t in sorted(study.counted(), key=lambda t: t.number):
        steps = max(t.intermediate_values) if t.intermediate_values else 0
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "params": dict(t.params),
                "overrides": t.user_attrs.get("overrides", []),
                "steps": steps,
                "source_val": t.value
                if t.state == TrialState.COMPLETE
                else (t.intermediate_values[steps] if steps else None),
                "folder": t.user_attrs.get("folder"),
                "stopped": t.user_attrs.get("stopped", ""),
                "retried": t.user_attrs.get("retries", []),
            }
        )
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The complete trial with the best last source-val score (the lowest number among equals)."""
    done = [r for r in rows if r["state"] == "complete" and r["source_val"] is not None]
    return max(done, key=lambda r: (r["source_val"], -r["trial"])) if done else None


def cost(study: Study, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs and training steps spent, against the full grid of the same knobs run to the end."""
    steps = study.cfg.train.steps
    grid = grid_size(study.knobs)
    starts = [t.datetime_start for t in study.counted() if t.datetime_start is not None]
    ends = [t.datetime_complete for t in study.counted() if t.datetime_complete is not None]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    return {
        "trials": len(rows),
        "complete": sum(r["state"] == "complete" for r in rows),
        "pruned": sum(r["state"] == "pruned" for r in rows),
        "failed": sum(r["state"] == "fail" for r in rows),
        "steps_trained": sum(r["steps"] for r in rows),
        "full_grid_runs": grid,
        "full_grid_steps": grid * steps,
        "run_steps": steps,
        "study_wall_s": None if span is None else round(span, 1),
    }


def summary(study: Study) -> dict[str, Any]:
    rows = trial_rows(study)
    return {
        "study": study.spec.name,
        "rule": study.rule,
        "budget": study.budget,
        "rows": rows,
        "best": best_row(rows),
        "cost": cost(study, rows),
    }


def format_summary(result: dict[str, Any], recipe: str, overrides: list[str]) -> str:
    """The trials as a table, the best trial's ``asg train`` command, and the cost."""
    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    head = ["trial", "state", "steps", "source-val %", *keys]
    lines = [f"study {result['study']} ({result['rule']}):", "  ".join(f"{h:>12}" for h in head)]
    for r in rows:
        score = f"{100 * r['source_val']:.2f}" if r["source_val"] is not None else "-"
        cells = [str(r["trial"]), r["state"], str(r["steps"]), score, *(f"{r['params'].get(k, '-'):.4g}" for k in keys)]
        lines.append("  ".join(f"{c:>12}" for c in cells))
    c = result["cost"]
    lines.append(
        f"cost: {c['trials']} trials ({c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed), "
        f"{c['steps_trained']} training steps; the full grid of the same knobs: {c['full_grid_runs']} runs, "
        f"{c['full_grid_steps']} steps" + (f"; {c['wall_s']:.0f} s" if "wall_s" in c else "")
    )
    best = result["best"]
    if best is None:
        lines.append("no trial completed: nothing to choose")
    else:
        sets = " ".join(f"--set {o}" for o in [*overrides, *best["overrides"]])
        lines.append(f"best: trial {best['trial']}, source-val {100 * best['source_val']:.2f} %, {best['folder']}")
        lines.append(f"  the same run: asg train --config {recipe} {sets}")
    return "\n".join(lines)
