"""Decision windows (docs/l2o.md, "Faithful to the release"): how many SGD steps run between two L2O decisions.

The first window has ``min_steps`` steps at scale 1 (it produces the first observation). Each later window
starts at step ``t`` (optimizer steps done so far) with ``current = t mod steps_per_epoch`` (steps done in
this epoch) and ``prev = t - current`` (steps of earlier epochs), and has length

* ``released``: ``max(min_steps, current + prev // 20)`` -- the official code as written (operator precedence);
* ``intended``: ``max(min_steps, (current + prev) // 20)`` -- about 5% of the steps done so far;

both clipped to the end of the epoch and of the run. So every epoch boundary is also a decision point.
"""

from __future__ import annotations

from typing import Any

RULES = ("released", "intended")


def next_window(rule: str, step: int, total_steps: int, steps_per_epoch: int | None, min_steps: int) -> int:
    """Length of the window that starts after ``step`` optimizer steps (``step >= 0``, ``step < total_steps``)."""
    if rule not in RULES:
        raise ValueError(f"window rule {rule!r} is not one of {', '.join(RULES)}")
    spe = steps_per_epoch or total_steps
    current = step % spe
    prev = step - current
    if step == 0:
        length = min_steps
    elif rule == "released":
        length = max(min_steps, current + prev // 20)
    else:
        length = max(min_steps, (current + prev) // 20)
    epoch_end = prev + spe
    return max(1, min(length, epoch_end - step, total_steps - step))


def window_lengths(rule: str, total_steps: int, steps_per_epoch: int | None, min_steps: int) -> list[int]:
    """All window lengths of a run; element 0 is the initial scale-1 window, the rest are one per action."""
    out, step = [], 0
    while step < total_steps:
        w = next_window(rule, step, total_steps, steps_per_epoch, min_steps)
        out.append(w)
        step += w
    return out


class WindowSchedule:
    """Incremental form of ``window_lengths``: ``end`` is the step at which the current window closes."""

    def __init__(self, rule: str, total_steps: int, steps_per_epoch: int | None, min_steps: int) -> None:
        self.rule, self.total_steps, self.min_steps = rule, total_steps, min_steps
        self.steps_per_epoch = steps_per_epoch
        self.start = 0
        self.end = next_window(rule, 0, total_steps, steps_per_epoch, min_steps)

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """Adopt an epoch length learned late (before the first window closes)."""
        self.steps_per_epoch = steps_per_epoch
        self.end = self.start + next_window(self.rule, self.start, self.total_steps, steps_per_epoch, self.min_steps)

    def is_end(self, step: int) -> bool:
        return step >= self.end

    @property
    def finished(self) -> bool:
        return self.end >= self.total_steps

    def advance(self) -> int:
        """Open the next window at the current end; returns its end step."""
        self.start = self.end
        self.end = self.start + next_window(
            self.rule, self.start, self.total_steps, self.steps_per_epoch, self.min_steps
        )
        return self.end

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start, self.end = int(state["start"]), int(state["end"])
        self.steps_per_epoch = state["steps_per_epoch"]
