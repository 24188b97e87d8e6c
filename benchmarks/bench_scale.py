"""Where a digits demo run's time goes, and ``torchrun`` on 2 processes against 1 (gloo, CPU).

Both run the commands users run, in fresh processes, and read the trainer's own per-phase timing
(``summary.json`` -> ``timing``, see ``asg.engine.timing``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ASG = [sys.executable, "-m", "asg"]


def demo_training_fraction(method: str = "asg") -> dict:
    """``asg demo --benchmarks digits --seeds 1 --methods METHOD --no-adapt`` (the default demo's settings, one
    run): the share of the training stage's wall time spent in training steps, and the phases of the run."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*ASG, "demo", "--out", tmp, "--benchmarks", "digits", "--seeds", "1", "--methods", method, "--no-adapt"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        process_wall = time.perf_counter() - t0
        report = json.loads((Path(tmp) / "digits" / "report.json").read_text())
    timing = report["timing"]
    return {
        "command": "asg " + " ".join(cmd[3:]).replace(tmp, "TMP"),
        "process_wall_s": round(process_wall, 1),
        "training_stage_wall_s": report["train_wall_time_s"],
        "phases_s": {k: v for k, v in timing.items() if k.endswith("_s")},
        "train_step_fraction": timing["train_step_fraction"],
        "train_step_fraction_of_process": round(timing["train_step_s"] / process_wall, 4),
        "target": "training steps at least 80% of a digits demo run's wall time",
    }


def _torchrun(nproc: int, out: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "asg",
        "train",
        "--config",
        "digits_erm",
        "--out",
        str(out),
    ]
    for kv in overrides:
        cmd += ["--set", kv]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun {nproc} failed:\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    timing = json.loads((out / "summary.json").read_text())["timing"]
    return {"process_wall_s": round(wall, 1), **timing}


def torchrun_throughput(steps: int = 40, batch: int = 32) -> dict:
    """``torchrun --nproc-per-node N -m asg train --config digits_erm`` on the CPU for N = 1 and 2, same global
    batch: training images/s over the loop (data, steps, checkpoints, one evaluation) and rank 0's peak memory.
    torchrun gives each of several processes one intra-op thread; the single process keeps the default."""
    overrides = [
        "train.device=cpu",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        f"data.batch_size={batch}",
        "data.num_train=2000",
        "data.eval_max_per_set=64",
        "eval.retention=false",
        "eval.full_eval_selected=false",
        "train.progress=false",
    ]
    out: dict = {"recipe": ["digits_erm", *overrides], "global_batch": batch, "backend": "gloo"}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            r = _torchrun(n, Path(tmp) / f"n{n}", overrides)
            r["train_images_per_s"] = round(r["steps_per_s"] * batch, 2) if r.get("steps_per_s") else None
            out[f"nproc_{n}"] = r
    one, two = out["nproc_1"], out["nproc_2"]
    out["throughput_ratio_2_vs_1"] = round(two["train_images_per_s"] / one["train_images_per_s"], 3)
    out["step_time_ratio_2_vs_1"] = round(two["train_step_s"] / one["train_step_s"], 3)
    if one.get("peak_rss_mib") and two.get("peak_rss_mib"):
        out["peak_rss_ratio_rank0_vs_1"] = round(two["peak_rss_mib"] / one["peak_rss_mib"], 3)
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    result = {}
    if what in ("all", "demo"):
        result["demo_run"] = demo_training_fraction()
    if what in ("all", "torchrun"):
        result["torchrun"] = torchrun_throughput()
    print(json.dumps(result, indent=1))
