"""`asg demo` without tuning trains every benchmark's runs in one queue, longest first, each run once."""

import pytest

import asg.demo as demo
from asg.config import load_config
from asg.engine.rundir.summary import RunSummary


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
    for length in set(steps):  # then seed by seed
        seeds = [int(str(f).rsplit("_seed", 1)[1]) for f, n in zip(folders, steps) if n == length]
        assert seeds == sorted(seeds)
    for recipe, overrides, folder in tasks:  # each with its benchmark's chosen rate and its own seed
        bench = demo.BENCHMARKS[folder.parent.parent.name]
        chosen = dict(bench.chosen)
        chosen.update({label: chosen[other] for label, other in bench.grid_from if other in chosen})
        method, seed = folder.name.rsplit("_seed", 1)
        cfg = load_config(recipe, overrides)
        assert cfg.train.seed == int(seed) and chosen[method]  # every trained label has a chosen point
        for item in chosen[method]:
            key, value = item.split("=", 1)
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == pytest.approx(float(value))


def test_the_long_protocol_queues_seed_by_seed_across_benchmarks(tmp_path, monkeypatch):
    """--full without a grid: whole seeds of both benchmarks come first, so a stopped demo can report them."""
    queues = []

    def first_queue_only(tasks, jobs):
        queues.append(tasks)
        raise QueueSeen

    monkeypatch.setattr(demo, "train_all", first_queue_only)
    with pytest.raises(QueueSeen):
        demo.run_demo(out=tmp_path, jobs=2, full=True, tune=False)
    seeds = [int(str(folder).rsplit("_seed", 1)[1]) for _, _, folder in queues[0]]
    benchmarks = [folder.parent.parent.name for _, _, folder in queues[0]]
    assert seeds == sorted(seeds) and set(benchmarks[: seeds.count(0)]) == {"digits", "scenes"}


def test_tuned_long_protocol_adds_seeds_where_three_spread_over_three_points(tmp_path):
    """5 seeds for a label whose 3 seeds' std on the first real set exceeds 3 points; the others keep 3."""
    tasks = demo._training_tasks(demo.DIGITS, tmp_path, [], 3, ["erm", "asg"], {})
    scores = {"erm": [0.50, 0.52, 0.51], "asg": [0.40, 0.50, 0.45]}  # std 0.01 and 0.05
    summaries = [
        RunSummary.from_dict(
            {
                "selections": {
                    "last": {"step": 1, "metrics": {"mnist5k_test": {"mean_class_acc": scores[t.label][t.seed]}}}
                }
            }
        )
        for t in tasks
    ]
    assert demo._wide_labels(demo.DIGITS, tasks, summaries) == ["asg"]
