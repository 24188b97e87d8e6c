"""Time the trainer's own step (``Trainer._train_step``, as ``asg train`` calls it) for a recipe, in a fresh
process so that its peak resident memory is its own."""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time


def _adaptation_trainer(cfg, data):
    """An adaptation round's trainer (``asg adapt``): pseudo-labels of ``adapt.target`` made now by the real
    ``pseudo_label`` with the starting model, then self-training. Returns (trainer, pseudo-labelling images/s)."""
    import tempfile
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
    trainer = Trainer(cfg, None, data=data, model=model, method=method, quiet=True,
                      target=PseudoLabeled(target, pseudo.indices, pseudo.label))  # fmt: skip
    return trainer, rate


def _measure(recipe: str, overrides: list[str], device: str, steps: int, warmup: int, queue, adapt: bool) -> None:
    import dataclasses

    import torch

    from asg.config import load_config
    from asg.data import build_data
    from asg.engine.trainer import Trainer

    common = [f"train.steps={steps + warmup}", "train.progress=false", f"train.device={device}",
              "eval.retention=false"]  # fmt: skip
    cfg = load_config(recipe, common + overrides)
    data = build_data(cfg.data)
    data = dataclasses.replace(data, eval_sets={}, source_val_name=None)  # time training only
    extra = {}
    if adapt:
        trainer, extra["pseudo_label_images_per_s"] = _adaptation_trainer(cfg, data)
    else:
        trainer = Trainer(cfg, None, data=data, quiet=True)
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
    t0 = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    queue.put(
        {
            "step_s_median": statistics.median(times[warmup:]),
            "step_s_mean": statistics.mean(times[warmup:]),
            "loop_s_per_step": wall / (steps + warmup),  # Trainer.run end to end: data, step, logging, checkpoints
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
