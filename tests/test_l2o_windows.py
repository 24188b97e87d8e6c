"""Decision windows reproduce the schedules of docs/l2o.md ("Faithful to the release")."""

from __future__ import annotations

import itertools

import pytest

from asg.l2o.windows import WindowSchedule, next_window, window_lengths


def per_epoch(lengths: list[int], steps_per_epoch: int) -> list[list[int]]:
    """Split the action windows (lengths[1:]) by the epoch they start in."""
    epochs: dict[int, list[int]] = {}
    step = lengths[0]
    for w in lengths[1:]:
        epochs.setdefault(step // steps_per_epoch, []).append(w)
        step += w
    return [epochs.get(e, []) for e in range(max(epochs) + 1)]


def test_visda_released_schedule():
    lengths = window_lengths("released", 30 * 4763, 4763, 10)
    assert lengths[0] == 10  # initial scale-1 window
    epochs = per_epoch(lengths, 4763)
    assert epochs[0] == [10, 20, 40, 80, 160, 320, 640, 1280, 2203]
    assert epochs[1] == [238, 476, 952, 1904, 1193]
    assert all(epochs[e] == [4763] for e in range(20, 30))  # epochs 21-30: one action per epoch
    assert len(lengths) - 1 == 66
    assert sum(lengths) == 30 * 4763


def test_gta5_released_schedule():
    lengths = window_lengths("released", 50 * 2000, 2000, 20)
    assert lengths[0] == 20
    epochs = per_epoch(lengths, 2000)
    assert epochs[0] == [20, 40, 80, 160, 320, 640, 720]
    assert epochs[1] == [100, 200, 400, 800, 500]
    assert all(epochs[e] == [2000] for e in range(20, 50))
    assert len(lengths) - 1 == 84


@pytest.mark.parametrize("epochs,spe,min_steps,actions", [(30, 4763, 10, 167), (50, 2000, 20, 155)])
def test_intended_rule_counts(epochs, spe, min_steps, actions):
    lengths = window_lengths("intended", epochs * spe, spe, min_steps)
    assert len(lengths) - 1 == actions
    step = lengths[0]
    for w in lengths[1:]:
        # about 5% of the steps done so far, at least min_steps, cut at the epoch end
        assert w == min(max(min_steps, step // 20), spe - step % spe)
        step += w


@pytest.mark.parametrize("rule", ["released", "intended"])
def test_windows_never_cross_epoch_or_run_end(rule):
    total, spe = 1234, 300
    step = 0
    for w in window_lengths(rule, total, spe, 7):
        assert w >= 1
        assert step // spe == (step + w - 1) // spe
        step += w
    assert step == total


@pytest.mark.parametrize("rule,spe", list(itertools.product(["released", "intended"], [None, 97])))
def test_incremental_schedule_matches_full_list(rule, spe):
    total = 2500
    sched = WindowSchedule(rule, total, spe, 10)
    ends = [sched.end]
    while not sched.finished:
        ends.append(sched.advance())
    assert ends == list(itertools.accumulate(window_lengths(rule, total, spe, 10)))


def test_unknown_rule():
    with pytest.raises(ValueError):
        next_window("as_released", 5, 100, None, 10)
