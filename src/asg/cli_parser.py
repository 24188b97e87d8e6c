"""The ``asg`` command line's arguments: one sub-parser per command (their handlers are in :mod:`asg.cli`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from asg.predict.cli import add_tta_flags


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default=None,
        help="YAML recipe (configs/*.yaml) or a packaged recipe name; not needed with --resume --out",
    )
    _add_set(p, "override a config field, e.g. --set optim.lr=0.01 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<recipe name>)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint and saved config"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``asg`` command line: every sub-command and its options (handlers in :mod:`asg.cli`)."""
    parser = argparse.ArgumentParser(prog="asg", description="Automated synthetic-to-real generalization (ASG).")
    from asg import __version__

    parser.add_argument("--version", action="version", version=f"asg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a recipe")
    _add_config_args(p)

    p = sub.add_parser("adapt", help="adapt a trained model to unlabelled real images (class-balanced self-training)")
    _add_config_args(p)
    p.add_argument(
        "--from",
        dest="init_from",
        default=None,
        metavar="RUN",
        help="the trained model: a run folder or .safetensors file (= --set model.init_from=RUN)",
    )
    p.add_argument(
        "--target",
        default=None,
        help="target images: a target set of the benchmark, a list file or a folder (= adapt.target)",
    )
    p.add_argument(
        "--from-unfinished",
        action="store_true",
        help="accept a --from run that never finished (= --set adapt.from_unfinished=true)",
    )

    p = sub.add_parser("evaluate", help="evaluate a run's checkpoint on its evaluation sets")
    p.add_argument(
        "run_dir",
        type=Path,
        nargs="?",
        help="a run folder, or a weight file from elsewhere (e.g. an official ASG .pth.tar) with --config",
    )
    p.add_argument(
        "--zero-shot",
        action="store_true",
        help="CLIP zero-shot classification of the recipe --config's classes, no run folder (asg.zero_shot)",
    )
    p.add_argument("--config", default=None, help="with a weight file: the recipe that builds its model and data")
    p.add_argument("--checkpoint", default="last", help="last | source-val | oracle | PATH.safetensors")
    add_tta_flags(p, "horizontal-flip TTA with sigmoid averaging (official VisDA protocol)")
    _add_set(p, "override the run's config, e.g. --set data.root=/new/path")
    p.add_argument("--out", type=Path, default=None, help="folder for the results (default: the run folder)")
    p.add_argument(
        "--wise-ft",
        dest="wise_ft",
        type=float,
        default=None,
        metavar="ALPHA",
        help="WiSE-FT: evaluate the backbone (1-ALPHA) x ImageNet + ALPHA x fine-tuned with the fine-tuned head "
        "(ALPHA in [0, 1]; written to eval_<checkpoint>_wise_ft<ALPHA>.json)",
    )

    _add_predict_parsers(sub)

    p = sub.add_parser("compare", help="one table of several finished runs (method, rates, seed, selections)")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders of `asg train`")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")

    p = sub.add_parser("demo", help="the embedded synthetic-to-real benchmarks (digits, digit scenes)")
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--quick", action="store_true", help="a short version: 1 seed, fewer steps (7.0 min measured on 2 CPU cores)"
    )
    length.add_argument(
        "--full",
        action="store_true",
        help="every method (also feature, l2sp, asg+random, csg; asg+l2o on scenes), 1,200 steps",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/demo or runs/demo-quick)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds per method")
    p.add_argument("--methods", default=None, help="comma-separated subset of the demo's methods")
    p.add_argument("--benchmarks", default=None, help="comma-separated subset of: digits, scenes (default both)")
    p.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tune each method on its grid, choosing on source-val only (default: with --full)",
    )
    p.add_argument("--no-adapt", dest="adapt", action="store_false", help="skip the adaptation stage (digits)")
    p.add_argument(
        "--backbone-rates",
        action="store_true",
        help="also train ERM and ASG at their chosen point with optim.backbone_lr_mult in 0.03, 0.1, "
        "0.3, 1 (the backbone rate alone; one figure)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs trained side by side in worker processes (default: one per CPU core, at most 4; 1 on a GPU)",
    )
    _add_set(p, "override every demo run's config, e.g. --set train.device=cuda")

    _add_sweep_parser(sub)
    from asg.clip_table import add_clip_table_parser

    add_clip_table_parser(sub, _add_set)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="check a dataset's layout and list files")
    c.add_argument(
        "name", help="visda17 | listfile | imagefolder | gta5 | synthia | cityscapes | bdd100k | mapillary | seglist"
    )
    c.add_argument("root", help="dataset root (or the list file for 'listfile' and 'seglist')")
    c.add_argument("--verify-images", action="store_true", help="also open every image (slow)")
    c.add_argument("--split", default=None, help="segmentation: the split to check (default: all there are)")
    c.add_argument("--class-set", type=int, default=None, help="segmentation: 19, or 16/13 for synthia")
    c.add_argument("--max-items", type=int, default=None, help="segmentation: read at most this many labels")
    c.add_argument("--num-classes", type=int, default=None, help="listfile, seglist: labels must be below this")
    c = dsub.add_parser("prepare", help="write train-id label PNGs and list files for a segmentation dataset")
    c.add_argument("name", help="gta5 | synthia | cityscapes | bdd100k | mapillary")
    c.add_argument("src", type=Path, help="the dataset as downloaded (only read)")
    c.add_argument("dst", type=Path, help="output folder (labels/, <split>.txt, prepared.json)")
    c.add_argument("--split", default="all", help="the split to prepare (default: every split the source has)")
    c.add_argument("--class-set", type=int, default=19, help="19, or 16/13 for synthia")

    p = sub.add_parser("l2o", help="learning-to-optimize: the layer-wise learning-rate policy")
    lsub = p.add_subparsers(dest="l2o_command", required=True)
    t = lsub.add_parser("train", help="meta-train a policy on synthetic data only")
    _add_config_args(t)
    return parser


def _add_predict_parsers(sub: argparse._SubParsersAction) -> None:
    """``asg predict`` and ``asg export`` (handlers in :mod:`asg.predict.cli`)."""
    from asg.predict.cli import add_export_parser, add_predict_parser

    add_predict_parser(sub, _add_set)
    add_export_parser(sub, _add_set)


def _add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    """``asg sweep`` (handler in :mod:`asg.tuning.cli`)."""
    from asg.tuning.cli import add_sweep_parser

    add_sweep_parser(sub, _add_set)
