"""`asg demo` without tuning trains every benchmark's runs in one queue, longest first, each run once."""

import pytest

import asg.demo as demo
from asg.config import load_config


class QueueSeen(Exception):
    pass


def test_every_benchmarks_runs_go_to_one_queue_longest_first(tmp_path, monkeypatch):
    queues = []

    def first_queue_only(tasks, jobs):
        queues.append((tasks, jobs))
        raise QueueSeen

    monkeypatch.setattr(demo, "train_all", first_queue_only)
    with pytest.raises(QueueSeen):
        demo.run_demo(out=tmp_path, jobs=2)
    ((tasks, jobs),) = queues
    folders = [folder for _, _, folder in tasks]
    expected = {
        tmp_path / name / "runs" / f"{method}_seed{seed}"
        for name in ("digits", "scenes")
        for method in demo.BENCHMARKS[name].default_methods
        if method != demo.WISE_FT  # WiSE-FT reuses ERM's runs
        for seed in range(3)
    }
    assert jobs == 2 and len(folders) == len(set(folders)) and set(folders) == expected
    steps = [load_config(recipe, overrides).train.steps for recipe, overrides, _ in tasks]
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1]  # the 400-step scenes runs first
    for recipe, overrides, folder in tasks:  # each with its benchmark's chosen rate and its own seed
        bench = demo.BENCHMARKS[folder.parent.parent.name]
        chosen = dict(bench.chosen)
        chosen.update({label: chosen[other] for label, other in bench.grid_from if other in chosen})
        method, seed = folder.name.rsplit("_seed", 1)
        cfg = load_config(recipe, overrides)
        assert cfg.train.seed == int(seed) and f"optim.lr={cfg.optim.lr:g}" in chosen[method]
