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
        rows.append({"trial": t.number, "state": t.state.name.lower(), "params": dict(t.params),
                     "overrides": t.user_attrs.get("overrides", []), "steps": steps,
                     "source_val": t.value if t.state == TrialState.COMPLETE else
                     (t.intermediate_values[steps] if steps else None),
                     "folder": t.user_attrs.get("folder"), "stopped": t.user_attrs.get("stopped", ""),
                     "retried": t.user_attrs.get("retries", [])})  # fmt: skip
    return rows


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The complete trial with the best last source-val score (the lowest number among equals)."""
    done = [r for r in rows if r["state"] == "complete" and r["source_val"] is not None]
    return max(done, key=lambda r: (r["source_val"], -r["trial"])) if done else None


def cost(study: Study, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs and training steps spent, against the full grid of the same knobs run to the end."""
    steps = study.cfg.train.steps
    grid = grid_size(study.knobs)
    return {"trials": len(rows), "complete": sum(r["state"] == "complete" for r in rows),
            "pruned": sum(r["state"] == "pruned" for r in rows), "failed": sum(r["state"] == "fail" for r in rows),
            "steps_trained": sum(r["steps"] for r in rows), "full_grid_runs": grid,
            "full_grid_steps": grid * steps, "run_steps": steps}  # fmt: skip


def summary(study: Study) -> dict[str, Any]:
    rows = trial_rows(study)
    return {"study": study.spec.name, "rule": study.rule, "budget": study.budget, "rows": rows,
            "best": best_row(rows), "cost": cost(study, rows)}  # fmt: skip
