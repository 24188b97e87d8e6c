"""Segmentation benchmarks: the trainer's own step (ERM vs ASG, live teacher) on the digit scenes, and images per
second of the file-based segmentation data pipeline (decode, id mapping, random scale, crop and flip).

Step-time ratios come from one process where the variants take turns (``bench_trainer.paired_step_times``),
memory from each variant's own process (``bench_trainer.trainer_step_time``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

SEG_VARIANTS = {"erm": "digit_scenes_erm", "asg_live_teacher": "digit_scenes_asg"}
STEPS = 15
WARMUP = 3


def segmentation_step_times(device: str = "cpu") -> dict:
    """``Trainer.train_step`` time of ERM and ASG (live teacher) on the digit scenes: the ratio from one process
    where both take turns on the same batches (``bench_trainer.paired_step_times``), peak memory from each
    variant's own process."""
    from bench_trainer import paired_step_times, trainer_step_time

    variants = {name: (recipe, ["teacher.cache=false"]) for name, recipe in SEG_VARIANTS.items()}
    results = {
        name: trainer_step_time(recipe, overrides, device, STEPS, WARMUP)
        for name, (recipe, overrides) in variants.items()
    }
    paired = paired_step_times(variants, device, steps=20, warmup=WARMUP)
    for name, r in results.items():
        r["separate_process_step_s_median"] = r["step_s_median"]
        r["step_s_median"] = paired[name]["step_s_median"]
    erm = results["erm"]
    ratios = {
        "asg_live_teacher": {
            "step_time_ratio": paired["asg_live_teacher"]["step_time_ratio"],
            "peak_mem_ratio": results["asg_live_teacher"]["peak_mem_mib"] / erm["peak_mem_mib"],
        }
    }
    return {"variants": results, "ratios_vs_erm": ratios}


def _write_fixture(root: Path, n: int, size: tuple[int, int]) -> Path:
    """``n`` random image/label PNG pairs of ``size`` (h, w) and a seglist file naming them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        label = rng.integers(0, 19, size, dtype=np.uint8)
        Image.fromarray(img).save(root / f"{i}.png")
        Image.fromarray(label).save(root / f"{i}_label.png")
        lines.append(f"{i}.png {i}_label.png")
    path = root / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def pipeline_throughput(num_workers: int = 2, n: int = 48, size: tuple[int, int] = (512, 1024)) -> dict:
    """Images per second through ``seglist`` + the training pair transform (scale 0.75-1.25, 256 crop, flip)."""
    import torch
    from torch.utils.data import DataLoader

    from asg.config import DataConfig
    from asg.data import build_data

    with tempfile.TemporaryDirectory() as tmp:
        listfile = _write_fixture(Path(tmp), n, size)
        cfg = DataConfig(
            name="seglist",
            train_list=str(listfile),
            scale_range=[0.75, 1.25],
            crop_size=[256, 256],
            source_val_fraction=0.0,
        )
        ds = build_data(cfg).train
        loader = DataLoader(ds, batch_size=8, num_workers=num_workers)
        t0 = time.perf_counter()
        count = 0
        for x, _y in loader:
            count += len(x)
        elapsed = time.perf_counter() - t0
    return {
        "images_per_s": count / elapsed,
        "num_workers": num_workers,
        "image_size": list(size),
        "crop": [256, 256],
        "torch_threads": torch.get_num_threads(),
    }
