"""Time the trainer's own step (``Trainer._train_step``, as ``asg train`` calls it) for a recipe, in a fresh
process so that its peak resident memory is its own."""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time


def _measure(recipe: str, overrides: list[str], device: str, steps: int, warmup: int, queue) -> None:
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
        }
    )


def trainer_step_time(recipe: str, overrides: list[str], device: str = "cpu", steps: int = 15, warmup: int = 3) -> dict:
    """Median ``Trainer._train_step`` seconds (after ``warmup`` steps) and peak memory of ``recipe``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(recipe, overrides, device, steps, warmup, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result
