"""Benchmarks (``make bench``): cost of ASG's teacher against plain ERM, measured in one run; L2O controller
cost; segmentation step time and memory (ASG vs ERM, the trainer's own step) and data-pipeline throughput.

Each variant runs in its own process on the same fixed batch (EfficientNet-Lite0, 32 x 3 x 64 x 64, BN frozen,
channels_last), so its peak resident memory is its own. Writes ``benchmarks/results.json``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

VARIANTS = {"erm": ("erm", False), "asg_live_teacher": ("asg", False), "asg_cached_teacher": ("asg", True)}


def _measure(method: str, cached: bool, device: str, steps: int, queue) -> None:
    import torch

    from asg.config import MethodConfig, ModelConfig, OptimConfig
    from asg.engine.optim import build_optimizer
    from asg.methods import build_method
    from asg.models import build_model, make_teacher

    torch.manual_seed(0)
    model = build_model(ModelConfig(), 10).to(device)
    teacher = make_teacher(model).to(device)
    loss_fn = build_method(MethodConfig(name=method, kl_weight=1.0))
    opt = build_optimizer(model.layer_groups(), OptimConfig(lr=0.01))
    x = torch.rand(32, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device=device)
    cache = teacher(x) if cached else None
    model.eval()
    times = []
    for i in range(steps + 3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        t_logits = (cache if cached else teacher(x)) if loss_fn.needs_teacher else None
        out = model(x)
        lo = loss_fn.loss(out, y, t_logits)
        opt.zero_grad(set_to_none=True)
        lo.loss.backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    queue.put(
        {
            "step_s_median": statistics.median(times),
            "step_s_mean": statistics.mean(times),
            "peak_mem_mib": peak,
            "memory_kind": "cuda allocated" if device.startswith("cuda") else "process RSS",
        }
    )


def run_variant(method: str, cached: bool, device: str, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(method, cached, device, steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    device = next((a for a in sys.argv[1:] if not a.startswith("--")), "cpu")
    steps = 20
    results = {name: run_variant(m, c, device, steps) for name, (m, c) in VARIANTS.items()}
    erm = results["erm"]
    ratios = {
        name: {
            "step_time_ratio": r["step_s_median"] / erm["step_s_median"],
            "peak_mem_ratio": r["peak_mem_mib"] / erm["peak_mem_mib"],
        }
        for name, r in results.items()
    }
    out = {
        "device": device,
        "batch": [32, 3, 64, 64],
        "backbone": "efficientnet_lite0",
        "steps": steps,
        "variants": results,
        "ratios_vs_erm": ratios,
        "target": "teacher forward adds at most 35% to an ERM step (asg_live_teacher step_time_ratio <= 1.35)",
    }
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_l2o import controller_overhead, meta_episode_time

    l2o = controller_overhead()
    l2o["overhead_vs_erm_step"] = l2o["controller_s_per_step"] / erm["step_s_median"]
    if device == "cpu" and "--no-meta" not in sys.argv:
        l2o.update(meta_episode_time())
    out["l2o"] = l2o
    if "--no-seg" not in sys.argv:
        from bench_seg import pipeline_throughput, segmentation_step_times

        out["segmentation"] = segmentation_step_times(device)
        out["segmentation"]["data_pipeline"] = pipeline_throughput()
    path = Path(__file__).parent / "results.json"
    path.write_text(json.dumps(out, indent=1))
    for name, r in results.items():
        print(
            f"{name:<20} step {1000 * r['step_s_median']:7.1f} ms  peak {r['peak_mem_mib']:7.0f} MiB  "
            f"ratio {ratios[name]['step_time_ratio']:.3f} time, {ratios[name]['peak_mem_ratio']:.3f} memory"
        )
    print("l2o:", json.dumps(out["l2o"]))
    if "segmentation" in out:
        seg = out["segmentation"]
        for name, r in seg["variants"].items():
            print(
                f"segmentation {name:<17} step {1000 * r['step_s_median']:7.1f} ms  peak {r['peak_mem_mib']:7.0f} MiB"
            )
        print("segmentation ASG/ERM:", json.dumps(seg["ratios_vs_erm"]["asg_live_teacher"]))
        print(f"segmentation data pipeline: {seg['data_pipeline']['images_per_s']:.1f} images/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
