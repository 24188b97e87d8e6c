"""L2O benchmarks: controller overhead per training step and meta-training wall time per episode (digits)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def controller_overhead(steps: int = 300) -> dict:
    """Mean time of ``L2OController.after_step`` over a ``steps``-step run (policy decisions included)."""
    import torch

    from asg.config import L2OConfig
    from asg.engine.control import StepStats
    from asg.l2o.controllers import L2OController
    from asg.l2o.policy import LRPolicy

    torch.manual_seed(0)
    groups = ["conv_stem", "bn0", "stage1", "stage2", "stage3", "stage4", "head"]
    ctrl = L2OController(LRPolicy(len(groups)).eval(), L2OConfig(), steps_per_epoch=169, seed=0)
    ctrl.start(groups, steps)
    decisions, t0 = 0, time.perf_counter()
    for step in range(1, steps + 1):
        stats = StepStats(step, steps, 1.0 / step, 0.1, 0.0, 0.05, 169)
        decisions += ctrl.after_step(stats) is not None
    per_step = (time.perf_counter() - t0) / steps
    return {"controller_s_per_step": per_step, "decisions": decisions, "steps": steps}


def meta_episode_time(episode_steps: int = 300) -> dict:
    """Wall time of one meta-training episode of ``configs/digits_l2o_meta.yaml`` (CPU, as configured)."""
    from asg.config import load_config
    from asg.l2o.meta import meta_train

    cfg = load_config(
        "digits_l2o_meta", ["l2o.episodes=1", f"l2o.episode_steps={episode_steps}", "train.progress=false"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        meta_train(cfg, Path(tmp) / "meta", quiet=True)
        return {"episode_s": time.perf_counter() - t0, "episode_steps": episode_steps}
