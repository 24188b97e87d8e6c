"""Design sweep of the digit scenes: ERM on variants of layout, image size, backbone, rate and length.

docs/demo/scenes_design.md quotes its table and figure. A variant is named by its tokens, e.g. ``L2_A64_bb03_1200``:

- layout and image size: ``A64`` (2-4 digits, 0.3-0.55 of the side: the default), ``B`` (1-2, 0.5-0.8),
  ``C`` (1-3, 0.4-0.7), ``D`` (1, 0.6-0.9), each followed by the side in pixels; both domains use the layout;
- ``L2``: EfficientNet-Lite2 instead of Lite0; ``lrXX``: head rate XX/100; ``bbXX``: backbone rate multiplier XX/10;
  ``b32``: batch 32; ``s2``: FPN down to stride 2; ``nXXXX``: synthetic scenes; ``asg``: proxy guidance (λ 0.1);
  ``wXX``: cross-entropy weight XX/10 on the background class (the other classes 1);
- a bare number: training steps (default 400), evaluated every ``max(100, steps // 8)``.

The layout is a set of module constants of :mod:`asg.data.segmentation.digit_scenes`, not config, and the background
weight is not a package option: each run is a child process that sets them before training ``digit_scenes_erm``
through :func:`asg.api.train`, with its scenes cached in a folder of its own layout.

    python benchmarks/scenes_sweep.py run OUT [--jobs N] [--device cuda] [NAME ...]   # appends OUT/summary.jsonl
    python benchmarks/scenes_sweep.py report SUMMARY.jsonl [--plot PNG]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LAYOUTS = {"A": ((2, 4), (0.3, 0.55)), "B": ((1, 2), (0.5, 0.8)), "C": ((1, 3), (0.4, 0.7)), "D": ((1, 1), (0.6, 0.9))}
VARIANTS = """A64 B64 C64 D64 A96 B96 B128 B64_n6000 B64_800 D64_1200 C64_1200 B64_1200 A64_1200 B96_1200 B64_lr02
B64_lr10 B64_b32 B64_s2 B64_bb03 B64_asg A64_w03 C64_w01 A64_w01_b32 A64_w01_lr02 A64_w01_bb03 A64_w01 C64_w01_1200
A64_bb03_1200 A64_w01_1200 A64_b32_1200 A64_w03_1200 D64_w01_1200 A64_w01_2400 A64_2400 L2_A64 A64_bb03 A64_bb10_1200
A64_lr03_bb03_1200 A96_bb03_1200 B64_bb03_1200 L2_A64_1200 L2_A64_bb03_1200 L2_A96_1200 A64_bb03_2400""".split()
PLOTTED = (
    "A64_1200",
    "A64_2400",
    "A64_bb03_2400",
    "A96_bb03_1200",
    "L2_A64_bb03_1200",
    "A64_w03_1200",
    "B64_1200",
    "D64_1200",
)
SET_SYN, SET_REAL = "synthetic", "mnist_photos"
BARS = {SET_SYN: 60.0, SET_REAL: 25.0}  # issue 15's bars on ERM's mean digit IoU


def parse(name: str) -> tuple[str, int, list[str], float]:
    """A variant's name -> (layout letter, image side, config overrides, background weight)."""
    layout, size, steps, weight = "A", 64, 400, 1.0
    overrides = ["optim.lr=0.05"]
    for token in name.split("_"):
        if token[0] in LAYOUTS and token[1:].isdigit():
            layout, size = token[0], int(token[1:])
        elif token.isdigit():
            steps = int(token)
        elif token == "L2":
            overrides.append("model.backbone=efficientnet_lite2")
        elif token == "asg":
            overrides += ["method.name=asg", "method.kl_weight=0.1"]
        elif token == "s2":
            overrides.append("model.fpn_finest_stride=2")
        else:
            key, value = token.rstrip("0123456789"), int(token.lstrip("abcdefghijklmnopqrstuvwxyz"))
            option = {
                "lr": f"optim.lr={value / 100}",
                "bb": f"optim.backbone_lr_mult={value / 10}",
                "b": f"data.batch_size={value}",
                "n": f"data.num_train={value}",
            }.get(key)
            if key == "w":
                weight = value / 10
            elif option is None:
                raise ValueError(f"unknown token {token!r} in {name!r}")
            else:
                overrides.append(option)
    length = [f"train.steps={steps}", f"train.eval_every={max(100, steps // 8)}"]
    return (
        layout,
        size,
        [*length, "data.eval_max_per_set=200", "eval.full_eval_selected=false", f"data.image_size={size}", *overrides],
        weight,
    )


def _child_code(layout: str, weight: float, call: str) -> str:
    (digits, height) = LAYOUTS[layout]
    code = [
        "import torch, asg.methods.erm as erm, asg.data.segmentation.digit_scenes as scenes",
        f"scenes.DIGITS_PER_SCENE, scenes.DIGIT_HEIGHT, scenes.SCENES_VERSION = {digits}, {height}, 100",
    ]
    if weight != 1.0:
        code += [
            "def weighted(logits, labels):",
            f"    w = torch.ones(logits.shape[1], device=logits.device); w[0] = {weight}",
            "    return torch.nn.functional.cross_entropy(logits.float(), labels, weight=w, ignore_index=255)",
            "erm.cross_entropy = weighted",
        ]
    return "\n".join([*code, call])


def run_one(name: str, work: Path, device: str, summary: Path) -> None:
    layout, _, overrides, weight = parse(name)
    overrides += [f"data.root={work / ('data_' + layout)}", f"train.device={device}"]
    call = f"from asg.api import train; train('digit_scenes_erm', {overrides!r}, out={str(work / name)!r}, quiet=True)"
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _child_code(layout, weight, call)], capture_output=True, text=True, env=env
    )
    rows = []
    results = work / name / "results.jsonl"
    for line in results.read_text().splitlines() if results.exists() else []:
        row = json.loads(line)
        metrics = {
            s: {"digit": sum(m["per_class_iou"][1:]) / 10, "bg": m["per_class_iou"][0], "miou": m["miou"]}
            for s, m in row["metrics"].items()
        }
        rows.append({"step": row["step"], **metrics})
    record = {
        "name": name,
        "wall": round(time.time() - start, 1),
        "rc": proc.returncode,
        "rows": rows,
        "err": proc.stderr[-1500:] if proc.returncode else "",
    }
    with summary.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(name, record["wall"], "s", record["err"][-300:], flush=True)


def render(layout: str, size: int, n: int, work: Path) -> None:
    """Render (and cache) a layout's synthetic and real scenes once, before the runs that share them start."""
    root = work / f"data_{layout}"
    call = f"scenes.synthetic_scenes({n}, 0, {size}, {str(root)!r}); scenes.real_scenes(500, 0, {size}, {str(root)!r})"
    subprocess.run(
        [sys.executable, "-c", _child_code(layout, 1.0, call)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def run(args: argparse.Namespace) -> None:
    out, work = Path(args.out), Path(args.out) / "runs"
    out.mkdir(parents=True, exist_ok=True)
    names = args.names or VARIANTS
    datasets = set()
    for name in names:
        layout, size, overrides, _ = parse(name)
        n = next((int(o.split("=")[1]) for o in overrides if o.startswith("data.num_train=")), 2000)
        datasets.add((layout, size, n))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda d: render(*d, work), sorted(datasets)))
    longest_first = sorted(names, key=lambda n: -int(parse(n)[2][0].split("=")[1]))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda n: run_one(n, work, args.device, out / "summary.jsonl"), longest_first))


def report(args: argparse.Namespace) -> None:
    records = {r["name"]: r for r in map(json.loads, Path(args.summary).read_text().splitlines())}
    print(
        "| variant | steps | synthetic digit IoU | real digit IoU | real background IoU | best real digit IoU (step) |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in sorted(records.items(), key=lambda kv: (kv[1]["rows"][-1]["step"], kv[0])):
        last, peak = r["rows"][-1], max(r["rows"], key=lambda row: row[SET_REAL]["digit"])
        print(
            f"| {name} | {last['step']} | {100 * last[SET_SYN]['digit']:.1f} | {100 * last[SET_REAL]['digit']:.1f} | "
            f"{100 * last[SET_REAL]['bg']:.1f} | {100 * peak[SET_REAL]['digit']:.1f} ({peak['step']}) |"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        for ax, split in zip(axes, (SET_SYN, SET_REAL)):
            for name in (n for n in PLOTTED if n in records):
                rows = records[name]["rows"]
                ax.plot([r["step"] for r in rows], [100 * r[split]["digit"] for r in rows], marker=".", label=name)
            ax.axhline(BARS[split], color="k", linestyle="--", linewidth=1, label="issue 15's bar")
            ax.set(title=f"ERM, mean digit IoU on {split} scenes", xlabel="step", ylabel="%", ylim=(0, 65))
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train the variants (all, or NAME ...)")
    p.add_argument("out")
    p.add_argument("names", nargs="*")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)
    p = sub.add_parser("report", help="the table (markdown) and, with --plot, the curves of PLOTTED")
    p.add_argument("summary")
    p.add_argument("--plot")
    p.set_defaults(func=report)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
