"""Benchmarks (``make bench``): cost of ASG's teacher against plain ERM, measured in one run; L2O controller
cost; adaptation (pseudo-labelling images/s, self-training step vs ERM step); segmentation step time and memory
(ASG vs ERM) and data-pipeline throughput.

Step times are the trainer's own ``Trainer.train_step`` on the digits recipes (EfficientNet-Lite0, batch 32 at
64 px, BN frozen, channels_last), each variant in its own process so that its peak resident memory is its own;
the same runs give the loop's end-to-end steps/s (``Trainer.fit`` with a run folder, checkpoints and evaluations),
and ``loop_overhead`` the loop's own cost: ``Trainer.fit`` with evaluation and checkpoints off against the bare
``Trainer.train_step`` on the same batches.
On the CPU also (``bench_scale``): the share of training steps in a digits demo run (``asg demo``, one run) and
``torchrun`` with 2 processes against 1 (gloo). Inference (``bench_predict``): images/s of ``asg predict``'s
Predictor on the CPU, PyTorch eager against onnxruntime and ``torch.compile``. ``--no-adapt``, ``--no-seg``,
``--no-meta``, ``--no-scale``, ``--no-predict`` skip parts; ``--only predict`` runs that one part and updates its
entry in the existing results. Writes ``benchmarks/results.json`` and ``benchmarks/results.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# name -> (recipe, overrides); digits_asg keeps the teacher cache on disk (fp32), built before the first step
DATA = ["data.num_train=360"]
VARIANTS = {
    "erm": ("digits_erm", DATA),
    "asg_live_teacher": ("digits_asg", [*DATA, "teacher.cache=false"]),
    "asg_cached_teacher": ("digits_asg", [*DATA, "teacher.cache=true"]),
}


ONLY = ("predict",)  # parts that `--only NAME` runs alone


def main() -> None:
    args = sys.argv[1:]
    only = None
    if "--only" in args:
        i = args.index("--only")
        only = args[i + 1] if i + 1 < len(args) else None
        if only not in ONLY:
            sys.exit(f"run.py: --only takes one of {', '.join(ONLY)}")
        del args[i : i + 2]
    device = next((a for a in args if not a.startswith("--")), "cpu")
    steps = 20
    sys.path.insert(0, str(Path(__file__).parent))
    if only is not None:
        return run_only(only)
    from bench_trainer import loop_overhead, paired_step_times, trainer_step_time

    # memory and the whole loop: each variant in its own process; step-time ratios: all variants in one process
    # taking turns on the same batches (on a shared machine the load changes between separate processes)
    results = {
        name: trainer_step_time(recipe, overrides, device, steps, warmup=3)
        for name, (recipe, overrides) in VARIANTS.items()
    }
    paired = paired_step_times(VARIANTS, device, steps=40)
    for name, r in results.items():
        r["separate_process_step_s_median"] = r["step_s_median"]
        r["step_s_median"] = paired[name]["step_s_median"]
        r["median_per_step_ratio"] = paired[name]["median_per_step_ratio"]
    erm = results["erm"]
    ratios = {
        name: {
            "step_time_ratio": paired[name]["step_time_ratio"],
            "peak_mem_ratio": r["peak_mem_mib"] / erm["peak_mem_mib"],
            "end_to_end_time_ratio": erm["end_to_end_steps_per_s"] / r["end_to_end_steps_per_s"],
        }
        for name, r in results.items()
    }
    out = {
        "device": device,
        "recipes": {name: [recipe, *overrides] for name, (recipe, overrides) in VARIANTS.items()},
        "timed": "Trainer.train_step (the trainer's own step: teacher, forward, loss, guard, backward, clipping, "
        "optimizer, controller) on the trainer's own batches: step_s_median and step_time_ratio from one process "
        "where the variants take turns on the same 40 batches (ratio of the medians; the median of per-step ratios "
        "is in variants.*.median_per_step_ratio); memory and "
        "the end-to-end loop rate from each variant's own process (20 steps after warm-up)",
        "steps": steps,
        "variants": results,
        "ratios_vs_erm": ratios,
        "target": "teacher forward adds at most 35% to an ERM step (asg_live_teacher step_time_ratio <= 1.35)",
    }
    out["loop_overhead"] = loop_overhead()
    from bench_l2o import controller_overhead, meta_episode_time

    l2o = controller_overhead()
    l2o["overhead_vs_erm_step"] = l2o["controller_s_per_step"] / erm["step_s_median"]
    if device == "cpu" and "--no-meta" not in sys.argv:
        l2o.update(meta_episode_time())
    out["l2o"] = l2o
    if "--no-adapt" not in sys.argv:
        adapt = trainer_step_time("digits_cbst", [*DATA, "data.real_split=halves"], device, steps, warmup=3, adapt=True)
        out["adaptation"] = {
            "recipe": "digits_cbst (target mnist5k_adapt, 2,500 images; source and target batches of 32)",
            "pseudo_label_images_per_s": adapt["pseudo_label_images_per_s"],
            "step": adapt,
            "step_time_ratio_vs_erm": adapt["step_s_median"] / erm["step_s_median"],
        }
    if "--no-seg" not in sys.argv:
        from bench_seg import pipeline_throughput, segmentation_step_times

        out["segmentation"] = segmentation_step_times(device)
        out["segmentation"]["data_pipeline"] = pipeline_throughput()  # 2 workers (the headline figure)
        out["segmentation"]["data_pipeline_by_workers"] = {w: pipeline_throughput(num_workers=w) for w in (0, 4)}
    if "--no-scale" not in sys.argv and device == "cpu":
        from bench_scale import demo_training_fraction, torchrun_throughput

        out["demo_run"] = demo_training_fraction()
        out["torchrun"] = torchrun_throughput()
    if "--no-predict" not in sys.argv:
        from bench_predict import predict_throughput

        print("inference (asg predict's Predictor, CPU):")
        out["predict"] = predict_throughput()
    path = Path(__file__).parent / "results.json"
    path.write_text(json.dumps(out, indent=1))
    (path.parent / "results.md").write_text(markdown_table(out))
    for name, r in results.items():
        print(
            f"{name:<20} step {1000 * r['step_s_median']:7.1f} ms  peak {r['peak_mem_mib']:7.0f} MiB  "
            f"ratio {ratios[name]['step_time_ratio']:.3f} time, {ratios[name]['peak_mem_ratio']:.3f} memory; "
            f"end to end {r['end_to_end_steps_per_s']:.2f} steps/s (ratio {ratios[name]['end_to_end_time_ratio']:.3f})"
        )
    lo = out["loop_overhead"]
    print(
        f"loop overhead: fit {min(lo['loop_s']):.2f} s vs bare train_step {min(lo['bare_steps_s']):.2f} s over "
        f"{lo['steps']} steps: ratio {lo['ratio']:.3f} (target <= 1.05)"
    )
    print("l2o:", json.dumps(out["l2o"]))
    if "adaptation" in out:
        a = out["adaptation"]
        print(
            f"adaptation: pseudo-labelling {a['pseudo_label_images_per_s']:.1f} images/s, step "
            f"{1000 * a['step']['step_s_median']:.1f} ms = {a['step_time_ratio_vs_erm']:.2f} x ERM"
        )
    if "segmentation" in out:
        seg = out["segmentation"]
        for name, r in seg["variants"].items():
            print(
                f"segmentation {name:<17} step {1000 * r['step_s_median']:7.1f} ms  peak {r['peak_mem_mib']:7.0f} MiB"
            )
        print("segmentation ASG/ERM:", json.dumps(seg["ratios_vs_erm"]["asg_live_teacher"]))
        by = {0: seg["data_pipeline_by_workers"][0], 2: seg["data_pipeline"], 4: seg["data_pipeline_by_workers"][4]}
        print(
            "segmentation data pipeline images/s by DataLoader workers: "
            + ", ".join(f"{w}: {r['images_per_s']:.1f}" for w, r in by.items())
        )
    if "demo_run" in out:
        d = out["demo_run"]
        print(
            f"digits demo run ({d['command']}): training steps {100 * d['train_step_fraction']:.1f} % of the "
            f"training stage's {d['training_stage_wall_s']:.1f} s; phases {json.dumps(d['phases_s'])}"
        )
    if "torchrun" in out:
        t = out["torchrun"]
        print(
            f"torchrun gloo: 1 process {t['nproc_1']['train_images_per_s']} images/s, 2 processes "
            f"{t['nproc_2']['train_images_per_s']} images/s (ratio {t['throughput_ratio_2_vs_1']}); rank-0 peak "
            f"RSS {t['nproc_1'].get('peak_rss_mib')} / {t['nproc_2'].get('peak_rss_mib')} MiB"
        )
    print(f"wrote {path}")


def run_only(name: str) -> None:
    """Run one part (``--only NAME``) and replace its entry in ``results.json``, keeping the others."""
    path = Path(__file__).parent / "results.json"
    out = json.loads(path.read_text()) if path.is_file() else {}
    if name == "predict":
        from bench_predict import predict_throughput

        print("inference (asg predict's Predictor, CPU):")
        out["predict"] = predict_throughput()
    path.write_text(json.dumps(out, indent=1))
    if "variants" in out:
        (path.parent / "results.md").write_text(markdown_table(out))
    print(f"wrote {path}")


def markdown_table(out: dict) -> str:
    """``benchmarks/results.md``: the measured figures and their ratios, one row each."""
    v, r = out["variants"], out["ratios_vs_erm"]

    def step(name: str) -> str:
        return f"{1000 * v[name]['step_s_median']:.1f} ms, {v[name]['peak_mem_mib']:.0f} MiB"

    rows = [
        ("digits ERM step", step("erm"), "1"),
        (
            "digits ASG, live teacher",
            step("asg_live_teacher"),
            f"{r['asg_live_teacher']['step_time_ratio']:.2f} time (target <= 1.35), "
            f"{r['asg_live_teacher']['peak_mem_ratio']:.2f} memory (target <= 1.20)",
        ),
        (
            "digits ASG, teacher logits from the disk cache",
            step("asg_cached_teacher"),
            f"{r['asg_cached_teacher']['step_time_ratio']:.2f} time (target <= 1.05), "
            f"{r['asg_cached_teacher']['peak_mem_ratio']:.2f} memory",
        ),
        (
            "whole training loop (data, steps, checkpoints, evaluations) ERM / ASG live / ASG cached",
            " / ".join(f"{v[n]['end_to_end_steps_per_s']:.2f}" for n in v) + " steps/s",
            " / ".join(f"{r[n]['end_to_end_time_ratio']:.2f}" for n in v) + " time",
        ),
    ]
    if "adaptation" in out:
        a = out["adaptation"]
        rows.append(
            (
                "adaptation step (32 synthetic + 32 pseudo-labelled real)",
                f"{1000 * a['step']['step_s_median']:.1f} ms",
                f"{a['step_time_ratio_vs_erm']:.2f} time",
            )
        )
        rows.append(
            ("pseudo-labelling (asg adapt's pseudo_label)", f"{a['pseudo_label_images_per_s']:.0f} images/s", "")
        )
    if "segmentation" in out:
        seg = out["segmentation"]
        sv, sr = seg["variants"], seg["ratios_vs_erm"]["asg_live_teacher"]
        rows.append(
            (
                "scenes ERM / ASG live step",
                f"{1000 * sv['erm']['step_s_median']:.1f} / {1000 * sv['asg_live_teacher']['step_s_median']:.1f} ms",
                f"{sr['step_time_ratio']:.2f} time, {sr['peak_mem_ratio']:.2f} memory",
            )
        )
        workers = {int(k): w for k, w in seg["data_pipeline_by_workers"].items()}  # int keys, or str from JSON
        by = [workers[0], seg["data_pipeline"], workers[4]]
        rows.append(
            (
                "segmentation data pipeline at 0 / 2 / 4 DataLoader workers",
                " / ".join(f"{b['images_per_s']:.1f}" for b in by) + " images/s",
                "",
            )
        )
    if "demo_run" in out:
        d = out["demo_run"]
        rows.append(
            (
                f"share of training steps in a digits demo run (`{d['command']}`)",
                f"{100 * d['train_step_fraction']:.1f} % of {d['training_stage_wall_s']:.1f} s",
                "target >= 80 %",
            )
        )
    if "torchrun" in out:
        t = out["torchrun"]
        rows.append(
            (
                "torchrun gloo on the CPU, digits ERM, global batch 32: 1 / 2 processes",
                f"{t['nproc_1']['train_images_per_s']:.1f} / {t['nproc_2']['train_images_per_s']:.1f} images/s, "
                f"rank-0 peak {t['nproc_1'].get('peak_rss_mib', 0):.0f} / "
                f"{t['nproc_2'].get('peak_rss_mib', 0):.0f} MiB",
                f"{t['throughput_ratio_2_vs_1']:.2f} throughput",
            )
        )
    if "loop_overhead" in out:
        lo = out["loop_overhead"]
        rows.append(
            (
                "Trainer.fit with evaluation and checkpoints off vs bare train_step, same batches",
                f"{min(lo['loop_s']):.2f} / {min(lo['bare_steps_s']):.2f} s for {lo['steps']} steps",
                f"{lo['ratio']:.3f} time (target <= 1.05)",
            )
        )
    if "predict" in out:
        from bench_predict import markdown_rows

        rows += markdown_rows(out["predict"])
    l2o = out["l2o"]
    rows.append(
        (
            "L2O controller",
            f"{1e6 * l2o['controller_s_per_step']:.0f} µs per step",
            f"{100 * l2o['overhead_vs_erm_step']:.2f} % of an ERM step",
        )
    )
    lines = [f"Measured by `make bench` on {out['device']}.", "", "| what | measured | ratio |", "|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows]) + "\n"


if __name__ == "__main__":
    main()
