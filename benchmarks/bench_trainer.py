"""Time the trainer's own step (``Trainer._train_step``, as ``asg train`` calls it) for a recipe, in a fresh
process so that its peak resident memory is its own."""

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
        pseudo = pseudo_label(model, target, cfg, 0.2, data.num_classes, Path(tmp), torch.device(cfg.train.device),
                              data.task)  # fmt: skip
    rate = len(target) / (time.perf_counter() - t0)
    method = SelfTraining(build_method(cfg.method), cfg.adapt)
    trainer = Trainer(cfg, out_dir, data=data, model=model, method=method, quiet=True,
                      target=PseudoLabeled(target, pseudo.indices, pseudo.label))  # fmt: skip
    return trainer, rate


def _measure(recipe: str, overrides: list[str], device: str, steps: int, warmup: int, queue, adapt: bool) -> None:
    import dataclasses

    import torch
    from torch.utils.data import Subset

    from asg.config import load_config
    from asg.data import build_data
    from asg.engine.trainer import Trainer

    # the whole loop as `asg train` runs it: a run folder, checkpoints and evaluations every 10 steps (on 64 images
    # per set, so that evaluation does not dominate a 20-step measurement)
    common = [f"train.steps={steps + warmup}", "train.progress=false", f"train.device={device}",
              "eval.retention=false", "train.eval_every=10", "train.checkpoint_every=10",
              "eval.full_eval_selected=false"]  # fmt: skip
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
    step = trainer._train_step

    def timed(*batch):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logs = step(*batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return logs

    trainer._train_step = timed  # type: ignore[method-assign]
    trainer.run()
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
            # Trainer.run's loop end to end: data, steps, logging, checkpoints and evaluations every 10 steps
            "end_to_end_steps_per_s": steps / loop_s,  # the warm-up steps' own time left out
            "loop_phases_s": {k: loop[f"{k}_s"] for k in ("data", "train_step", "checkpoint", "eval")},
            "peak_mem_mib": peak,
            "memory_kind": "cuda allocated" if device.startswith("cuda") else "process RSS",
            "batch": [cfg.data.batch_size, 3, cfg.data.image_size, cfg.data.image_size],
            "model": cfg.model.backbone + (f"+{cfg.model.segmenter}" if data.is_segmentation else ""),
            "timed_steps": len(times) - warmup,
            **extra,
        }
    )


def trainer_step_time(
    recipe: str, overrides: list[str], device: str = "cpu", steps: int = 15, warmup: int = 3, adapt: bool = False
) -> dict:
    """Median ``Trainer._train_step`` seconds (after ``warmup`` steps) and peak memory of ``recipe``; ``adapt``:
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
    from asg.engine.sampler import IndexedDataset
    from asg.engine.trainer import Trainer

    common = ["train.progress=false", f"train.device={device}", "eval.retention=false"]
    configs = {name: load_config(recipe, common + overrides) for name, (recipe, overrides) in variants.items()}
    data = build_data(next(iter(configs.values())).data)
    trainers = {name: Trainer(cfg, None, data=data, quiet=True) for name, cfg in configs.items()}
    batch = next(iter(configs.values())).data.batch_size
    loader = DataLoader(IndexedDataset(data.train), batch_size=batch, shuffle=True, drop_last=True,
                        collate_fn=collate_skip_none, generator=torch.Generator().manual_seed(0))  # fmt: skip
    batches = [b for b, _ in zip(loader, range(steps + warmup))]
    names = list(trainers)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i, (x, y, idx) in enumerate(batches):
        order = names[i % len(names) :] + names[: i % len(names)]  # each variant in each position in turn
        for name in order:
            trainer = trainers[name]
            t0 = time.perf_counter()
            trainer._train_step(x, y, idx)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            trainer.step += 1
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
    """Every variant's ``Trainer._train_step`` in one process, taking turns on the same batches (the order rotated
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
