"""Time the trainer's own step (``Trainer.train_step``, as ``asg train`` calls it) for a recipe, in a fresh
process so that its peak resident memory is its own; and the loop's cost on top of its steps."""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import tempfile
import time


def _adaptation_trainer(cfg, data, out_dir):
    """An adaptation round's trainer (``asg adapt``): pseudo-labels of ``adapt.target`` made now by the real
    ``pseudo_label`` with the starting model, then self-training. Returns (trainer, pseudo-labelling images/s)."""
    from pathlib import Path

    import torch

    from asg.adapt import pseudo_label
    from asg.data.targets import PseudoLabeled
    from asg.engine.trainer import Trainer
    from asg.methods import SelfTraining, build_method
    from asg.models import build_model

    target = data.target_sets[cfg.adapt.target]
    model = build_model(cfg.model, data.num_classes, task=data.task)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        pseudo = pseudo_label(
            model, target, cfg, 0.2, data.num_classes, Path(tmp), torch.device(cfg.train.device), data.task
        )
    rate = len(target) / (time.perf_counter() - t0)
    method = SelfTraining(build_method(cfg.method), cfg.adapt)
    trainer = Trainer(
        cfg,
        out_dir,
        data=data,
        model=model,
        method=method,
        quiet=True,
        target=PseudoLabeled(target, pseudo.indices, pseudo.label),
    )
    return trainer, rate


def _measure(recipe: str, overrides: list[str], device: str, steps: int, warmup: int, queue, adapt: bool) -> None:
    import dataclasses

    import torch
    from torch.utils.data import Subset

    from asg.config import load_config
    from asg.data import build_data
    from asg.engine.trainer import Trainer
    from asg.tasks import task_of

    # the whole loop as `asg train` runs it: a run folder, checkpoints and evaluations every 10 steps (on 64 images
    # per set, so that evaluation does not dominate a 20-step measurement)
    common = [
        f"train.steps={steps + warmup}",
        "train.progress=false",
        f"train.device={device}",
        "eval.retention=false",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "eval.full_eval_selected=false",
    ]
    cfg = load_config(recipe, common + overrides)
    data = build_data(cfg.data)
    small = {k: Subset(v, range(min(64, len(v)))) for k, v in data.eval_sets.items()}
    data = dataclasses.replace(data, eval_sets=small)
    extra = {}
    tmp = tempfile.TemporaryDirectory()
    if adapt:
        trainer, extra["pseudo_label_images_per_s"] = _adaptation_trainer(cfg, data, tmp.name)
    else:
        trainer = Trainer(cfg, tmp.name, data=data, quiet=True)
    times: list[float] = []
    step = trainer.train_step

    def timed(batch):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return out

    trainer.train_step = timed  # type: ignore[method-assign]
    trainer.fit()
    loop = trainer.timer.summary(steps + warmup)
    loop_s = sum(loop[f"{k}_s"] for k in ("data", "train_step", "checkpoint", "eval")) - sum(times[:warmup])
    tmp.cleanup()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    queue.put(
        {
            "step_s_median": statistics.median(times[warmup:]),
            "step_s_mean": statistics.mean(times[warmup:]),
            # Trainer.fit's loop end to end: data, steps, logging, checkpoints and evaluations every 10 steps
            "end_to_end_steps_per_s": steps / loop_s,  # the warm-up steps' own time left out
            "loop_phases_s": {k: loop[f"{k}_s"] for k in ("data", "train_step", "checkpoint", "eval")},
            "peak_mem_mib": peak,
            "memory_kind": "cuda allocated" if device.startswith("cuda") else "process RSS",
            "batch": [cfg.data.batch_size, 3, cfg.data.image_size, cfg.data.image_size],
            "model": cfg.model.backbone + (f"+{cfg.model.segmenter}" if task_of(data).per_pixel else ""),
            "timed_steps": len(times) - warmup,
            **extra,
        }
    )


def trainer_step_time(
    recipe: str, overrides: list[str], device: str = "cpu", steps: int = 15, warmup: int = 3, adapt: bool = False
) -> dict:
    """Median ``Trainer.train_step`` seconds (after ``warmup`` steps) and peak memory of ``recipe``; ``adapt``:
    of an adaptation round's step (source + pseudo-labelled target batch), plus pseudo-labelling images/s."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(recipe, overrides, device, steps, warmup, queue, adapt))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _paired(variants: dict, device: str, steps: int, warmup: int, queue) -> None:
    import statistics as st

    import torch
    from torch.utils.data import DataLoader

    from asg.config import load_config
    from asg.data import build_data, collate_skip_none
    from asg.engine.batches import StepBatch
    from asg.engine.sampler import IndexedDataset
    from asg.engine.trainer import Trainer

    common = ["train.progress=false", f"train.device={device}", "eval.retention=false"]
    configs = {name: load_config(recipe, common + overrides) for name, (recipe, overrides) in variants.items()}
    data = build_data(next(iter(configs.values())).data)
    trainers = {name: Trainer(cfg, None, data=data, quiet=True) for name, cfg in configs.items()}
    batch = next(iter(configs.values())).data.batch_size
    loader = DataLoader(
        IndexedDataset(data.train),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_skip_none,
        generator=torch.Generator().manual_seed(0),
    )
    batches = [b for b, _ in zip(loader, range(steps + warmup))]
    names = list(trainers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, (x, y, idx) in enumerate(batches):
        order = names[i % len(names) :] + names[: i % len(names)]  # each variant in each position in turn
        for name in order:
            trainer = trainers[name]
            t0 = time.perf_counter()
            trainer.train_step(StepBatch(x, y, idx))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    first = names[0]
    queue.put(
        {
            name: {
                "step_s_median": st.median(times[name][warmup:]),
                # the headline: ratio of the two medians over the same interleaved steps
                "step_time_ratio": st.median(times[name][warmup:]) / st.median(times[first][warmup:]),
                # also: the median of the per-step ratios (same batch, adjacent in time); noisier per step
                "median_per_step_ratio": st.median(a / b for a, b in zip(times[name][warmup:], times[first][warmup:])),
            }
            for name in names
        }
    )


def paired_step_times(variants: dict, device: str = "cpu", steps: int = 40, warmup: int = 3) -> dict:
    """Every variant's ``Trainer.train_step`` in one process, taking turns on the same batches (the order rotated
    each step): the ratio to the first variant is the ratio of their medians over the same interleaved steps, so
    a load that changes during the measurement hits every variant alike. Memory is measured per process by
    :func:`trainer_step_time`."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_paired, args=(variants, device, steps, warmup, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _loop_vs_steps(recipe: str, overrides: list[str], steps: int, rounds: int, queue) -> None:
    import dataclasses

    import torch

    from asg.config import load_config
    from asg.data import build_data
    from asg.engine.trainer import Trainer

    torch.set_num_threads(1)  # one thread per measured process: less noise from the machine's other work
    cfg = load_config(recipe, [f"train.steps={steps}", "train.progress=false", *overrides])
    data = dataclasses.replace(build_data(cfg.data), eval_sets={}, source_val_name=None)  # evaluation off
    loop_s, bare_s = [], []
    for _ in range(rounds):  # alternate, so that a change of the machine's load hits both alike
        trainer = Trainer(cfg, None, data=data, quiet=True)  # no run folder: no checkpoint
        trainer.fit()
        timing = trainer.timer.summary(steps)
        loop_s.append(timing["wall_s"] - timing["setup_s"])
        trainer = Trainer(cfg, None, data=data, quiet=True)
        trainer.batches.begin(0)
        batches = list(trainer.batches)  # the same batches, fetched before the clock starts
        t0 = time.perf_counter()
        for batch in batches:
            trainer.train_step(batch)
        bare_s.append(time.perf_counter() - t0)
    queue.put({"loop_s": loop_s, "bare_steps_s": bare_s, "steps": steps})


def loop_overhead(recipe: str = "digits_asg", overrides: list[str] | None = None, steps: int = 30, rounds: int = 3):
    """``Trainer.fit`` (evaluation and checkpoints off: no evaluation set, no run folder) against the bare
    ``Trainer.train_step`` on the same batches, in one process: the loop's own cost (data loading, callbacks,
    logging). Ratio of the fastest of ``rounds`` alternated measurements; target <= 1.05."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    overrides = overrides if overrides is not None else ["data.num_train=360", "teacher.cache=false"]
    proc = ctx.Process(target=_loop_vs_steps, args=(recipe, overrides, steps, rounds, queue))
    proc.start()
    r = queue.get()
    proc.join()
    r.update(recipe=[recipe, *overrides], ratio=min(r["loop_s"]) / min(r["bare_steps_s"]), target="<= 1.05")
    return r
