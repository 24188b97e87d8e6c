"""The ``asg sweep`` command (parser and handler; ``asg.cli`` registers them)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from asg.errors import ConfigError


def add_sweep_parser(sub: argparse._SubParsersAction, add_set: Callable[[argparse.ArgumentParser, str], None]) -> None:
    p = sub.add_parser("sweep", help="tune a recipe's method on Optuna (ASHA pruning, chosen on source-val)")
    p.add_argument(
        "--config", required=True, help="the recipe whose method is tuned (its search space: docs/sweeps.md)"
    )
    add_set(p, "override every trial's config (length, data, device), e.g. --set train.steps=1200")
    p.add_argument("--out", type=Path, default=None, help="sweep folder (default runs/sweeps/<recipe name>)")
    p.add_argument("--trials", type=int, default=8, help="the study's budget over all workers (default 8)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random", "grid"], help="default tpe (seeded)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument(
        "--pruner",
        default="asha",
        choices=["asha", "asha-async", "none"],
        help="asha (default): successive halving in trial order, a one-worker study's decisions with any number of "
        "workers (for equal trial scores: see --threads); asha-async: Optuna's own, no waiting, decisions depend on "
        "timing",
    )
    p.add_argument(
        "--min-resource", type=int, default=None, metavar="STEPS", help="ASHA's first rung (default train.eval_every)"
    )
    p.add_argument("--reduction-factor", type=int, default=3, help="ASHA keeps 1/this of each rung (default 3)")
    p.add_argument(
        "--storage",
        default=None,
        help="postgresql://USER@HOST/DB to share the study between machines "
        "(run the same command on each); default: the journal file <out>/optuna.journal",
    )
    p.add_argument("--study-name", default=None, help="default: the sweep folder's name")
    p.add_argument(
        "--range",
        dest="ranges",
        action="append",
        default=[],
        metavar="KEY=LOW:HIGH[:V1,V2,...]",
        help="narrow a knob, e.g. optim.lr=0.003:0.3:0.01,0.03,0.1 (grid values for --sampler grid)",
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker process with --jobs > 1 (default: the cores shared out); CPU scores, and so "
        "the pruning, depend on it",
    )


def sweep_command(args: argparse.Namespace) -> int:
    from asg.registries import load_checked_config
    from asg.tuning.launch import sweep
    from asg.tuning.results import format_summary

    cfg = load_checked_config(args.config, args.overrides)
    out = args.out if args.out is not None else Path("runs") / "sweeps" / (cfg.name or Path(args.config).stem)
    result = sweep(
        args.config,
        out,
        args.overrides,
        trials=args.trials,
        sampler=args.sampler,
        seed=args.seed,
        pruner=args.pruner,
        storage=args.storage,
        jobs=args.jobs,
        threads=args.threads,
        study_name=args.study_name,
        min_resource=args.min_resource,
        reduction_factor=args.reduction_factor,
        ranges=dict(_parse_range(r) for r in args.ranges),
    )
    if os.environ.get("RANK", "0") not in ("", "0"):
        return 0
    print(format_summary(result, args.config, args.overrides))
    print(f"sweep folder: {out}")
    return 0


def _parse_range(text: str) -> tuple[str, tuple[float, float, tuple[float, ...]]]:
    key, sep, value = text.partition("=")
    parts = value.split(":")
    try:
        low, high = float(parts[0]), float(parts[1])
        grid = tuple(float(v) for v in parts[2].split(",")) if len(parts) > 2 else (low, high)
    except (ValueError, IndexError):
        raise ConfigError(f"--range {text!r}: write KEY=LOW:HIGH or KEY=LOW:HIGH:V1,V2,...") from None
    return key, (low, high, grid)
