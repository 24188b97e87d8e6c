"""The ``asg`` command: a thin layer over ``asg.api``; user errors print one message, no traceback."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from asg.cli_parser import build_parser
from asg.errors import AsgError, ConfigError

if TYPE_CHECKING:
    from asg.config import Config


def _check_config_args(args: argparse.Namespace, command: str, default_out: Callable[[Config], Path]) -> None:
    """``--config`` is needed unless ``--resume --out``; with ``--resume`` say what ``--config`` is used for.

    ``default_out(cfg)`` is the run folder a recipe's config names when ``--out`` is absent.
    """
    if args.config is None:
        if args.resume and args.out is not None:
            return
        raise ConfigError(f"asg {command} needs --config RECIPE (or --resume --out RUN_FOLDER to continue a run)")
    if not args.resume:
        return
    if args.out is not None:
        note = f"--resume continues {args.out} with its saved config.yaml; --config {args.config} is ignored"
    else:
        from asg.registries import load_checked_config

        folder = default_out(load_checked_config(args.config, args.overrides))
        note = (
            f"--resume continues {folder} with its saved config.yaml; --config {args.config} is only used to find "
            "the run folder (default runs/<name>)"
        )
    print(f"asg: note: {note}", file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    from asg.api import default_run_dir, train

    _check_config_args(args, "train", default_run_dir)
    result = train(args.config, args.overrides, out=args.out, resume=args.resume)
    if os.environ.get("RANK", "0") not in ("", "0"):  # under torchrun, process 0 alone reports
        return 0
    print(f"\nrun folder: {result.out_dir}")
    for rule, sel in result.selections.items():
        metric, label = result.task.primary_metric, result.task.label
        values = ", ".join(f"{k} {100 * v[metric]:.1f}" for k, v in sel["metrics"].items() if metric in v)
        print(f"  [{rule} @ step {sel['step']}, tta_flip={sel['tta_flip']}] {label} %: {values}")
        if "real_average" in sel:
            avg = sel["real_average"]
            print(f"    average over {', '.join(avg['over'])}: {100 * avg['value']:.1f}")
    timing = _timing_line(result.out_dir)
    if timing:
        print(timing)
    print(f"report: {result.out_dir}/report.md")
    return 0


def _timing_line(out_dir: Path | None) -> str | None:
    """Where this process's wall time went (from summary.json), one line."""
    from asg.engine.rundir.folder import RunDir

    try:
        summary = RunDir(out_dir).read_summary() if out_dir is not None else None
    except AsgError:
        return None
    t = summary.timing if summary is not None else None
    if not t or not t.get("wall_s"):
        return None
    parts = ", ".join(
        f"{k} {100 * t.get(f'{k}_s', 0.0) / t['wall_s']:.0f} %" for k in ("setup", "train_step", "eval", "final")
    )
    return f"time: {t['steps']} steps in {t['wall_s']:.1f} s ({parts})"


def _adapt(args: argparse.Namespace) -> int:
    from asg.api import adapt, default_run_dir
    from asg.tasks import task_with_metric

    if args.init_from is not None:
        args.overrides.append(f"model.init_from={args.init_from}")
    if args.target is not None:
        args.overrides.append(f"adapt.target={args.target}")
    if args.from_unfinished:
        args.overrides.append("adapt.from_unfinished=true")
    _check_config_args(args, "adapt", default_run_dir)
    result = adapt(args.config, args.overrides, out=args.out, resume=args.resume)
    metric = result.primary_metric
    label = task_with_metric(metric).label
    rows = [("start", result.start)] + [(f"round {r['round']}", r) for r in result.rounds]
    print(f"\nadaptation folder: {result.out_dir} (target {result.target})")
    for name, row in rows:
        values = ", ".join(f"{k} {100 * v[metric]:.1f}" for k, v in row["metrics"].items() if metric in v)
        print(f"  [{name}] {label} %: {values}")
    print(f"report: {result.out_dir}/report.md")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from asg.api import evaluate, save_evaluation
    from asg.tasks import get_task

    if args.zero_shot:  # no run folder: the recipe's CLIP tower and its text tower over the classes
        if args.config is None or args.run_dir is not None or args.wise_ft is not None:
            raise AsgError("asg evaluate --zero-shot takes --config RECIPE (a CLIP recipe), no run folder or --wise-ft")
        from asg.zero_shot import evaluate_zero_shot

        result = evaluate_zero_shot(args.config, args.overrides, args.tta_flip)
        if args.out is None:
            args.out = Path("runs") / f"{Path(args.config).stem}_zero_shot"
    elif args.run_dir is None:
        raise AsgError("asg evaluate needs a run folder (or a weight file with --config, or --zero-shot --config)")
    else:
        result = evaluate(
            args.run_dir, args.checkpoint, args.tta_flip, args.overrides, wise_ft=args.wise_ft, config=args.config
        )
    alpha = result.get("wise_ft_alpha")
    label = f", wise_ft_alpha={alpha:g}" if alpha is not None else ""  # on every result line of a WiSE-FT model
    print(f"checkpoint {result['checkpoint']} ({result['checkpoint_file']}), tta_flip={result['tta_flip']}{label}")
    if result["note"]:
        print(result["note"])
    task = get_task(result["task"])
    overall, primary = task.overall, task.primary_metric
    heads = (f"{task.overall_label} %", f"{task.label} %")
    extra = f"{'wise_ft_alpha':>15}" if alpha is not None else ""
    print(f"{'set':<16}{'role':<12}{'n':>10}{heads[0]:>12}{heads[1]:>18}{extra}")
    for name, r in result["sets"].items():
        extra = f"{alpha:>15g}" if alpha is not None else ""
        print(f"{name:<16}{r['role']:<12}{r['n']:>10}{100 * r[overall]:>12.2f}{100 * r[primary]:>18.2f}{extra}")
    if "real_average" in result:
        avg = result["real_average"]
        print(f"average {avg['metric']} over {', '.join(avg['over'])}: {100 * avg['value']:.2f}{label}")
    run_dir = Path(args.run_dir) if args.run_dir is not None else Path(".")
    out = args.out if args.out is not None else run_dir if run_dir.is_dir() else run_dir.parent
    try:
        path = save_evaluation(result, out)
    except OSError as exc:
        raise AsgError(
            f"cannot write the evaluation: the folder {out} is not writable ({exc.strerror or exc}); "
            "pass --out DIR to write it elsewhere"
        ) from None
    print(f"wrote {path}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from asg.data import check_dataset

    options = {k: v for k in ("split", "class_set", "max_items", "num_classes") if (v := getattr(args, k)) is not None}
    report = check_dataset(args.name, args.root, verify_images=args.verify_images, **options)
    print(report.format())
    return 0 if report.ok else 1


def _data_prepare(args: argparse.Namespace) -> int:
    from asg.data.segmentation.prepare import prepare

    report = prepare(args.name, args.src, args.dst, split=args.split, class_set=args.class_set)
    print(report.format())
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    from asg.demo import run_demo

    methods = args.methods.split(",") if args.methods else None
    benchmarks = args.benchmarks.split(",") if args.benchmarks else None
    report = run_demo(
        out=args.out,
        quick=args.quick,
        seeds=args.seeds,
        methods=methods,
        overrides=args.overrides,
        benchmarks=benchmarks,
        full=args.full,
        tune=args.tune,
        adapt=args.adapt,
        jobs=args.jobs,
        backbone_rates=args.backbone_rates,
    )
    print(report["markdown_table"])
    print(f"\nreport: {report['out_dir']}/report.md")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from asg.compare import compare_runs, table

    print(table(compare_runs(args.runs), markdown=args.markdown))
    return 0


def _l2o_default_out(cfg: Config) -> Path:
    from asg.api import default_run_dir

    return default_run_dir(cfg, "l2o")


def _l2o_train(args: argparse.Namespace) -> int:
    from asg.api import run_config
    from asg.l2o.meta import meta_train

    _check_config_args(args, "l2o train", _l2o_default_out)
    cfg, out = run_config(
        args.config,
        args.overrides,
        args.out,
        args.resume,
        "an `asg l2o train` folder",
        "meta-training",
        default_name="l2o",
    )
    policy = meta_train(cfg, out, resume=args.resume)
    print(f"policy: {policy}")
    return 0


# errno -> what to do; an OSError with one of these (or with a file name) is reported in one line
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or choose another --out",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another --out",
    errno.EACCES: "permission denied: choose another --out (a folder you can write)",
    errno.EPERM: "operation not permitted: choose another --out (a folder you can write)",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EFBIG: "the file exceeds the file size limit (ulimit -f or the file system's): raise it or use another disk",
}
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _os_error_line(exc: OSError) -> str | None:
    """One line for an OSError about a file or the disk; None for others (they are bugs: re-raised)."""
    hint = _OS_HINTS.get(exc.errno) if exc.errno is not None else None
    if exc.filename is None and hint is None:
        return None
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        verb = "write" if exc.errno in _WRITE_ERRNOS else "read" if exc.errno == errno.ENOENT else "write/read"
        reason = f"cannot {verb} {exc.filename}: {reason}"
    return f"{reason} ({hint})" if hint else reason


def _error_line(exc: AsgError) -> str:
    """The message of ``exc``; for one re-raised from a DataLoader worker (torch puts the worker's traceback in
    the message) only the original message, without the ``asg.errors.DataError: `` prefix."""
    text = str(exc)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return re.sub(rf"^(?:[\w.]+\.)?{re.escape(type(exc).__name__)}: ", "", last)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings from ``asg`` print as one ``asg: warning:`` line; others keep Python's format."""
    if str(getattr(category, "__module__", "")).startswith("asg"):
        print(f"asg: warning: {message}", file=file or sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    from asg.clip_table import clip_table_command
    from asg.predict.cli import export_command, predict_command
    from asg.tuning.cli import sweep_command

    handlers = {
        "train": _train,
        "adapt": _adapt,
        "evaluate": _evaluate,
        "demo": _demo,
        "predict": predict_command,
        "export": export_command,
        "sweep": sweep_command,
        "clip-table": clip_table_command,
        "compare": _compare,
    }
    try:
        if args.command not in ("train", "sweep") and os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
            raise AsgError(
                f"asg {args.command} runs on one process; under torchrun only `asg train` and `asg "
                "sweep` are distributed (start this command without torchrun)"
            )
        if args.command == "data":
            return _data_check(args) if args.data_command == "check" else _data_prepare(args)
        with _sigterm_as_interrupt():  # docker stop, SLURM, systemd: stopped as Ctrl-C stops, with the same word
            if args.command == "l2o":
                return _l2o_train(args)
            return handlers[args.command](args)
    except AsgError as exc:
        print(f"asg: error: {_error_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # last line of defence: a full disk, a read-only folder, a missing file
        line = _os_error_line(exc)
        if line is None:
            raise
        print(f"asg: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Terminated)
        print(f"asg: {'stopped by SIGTERM' if term else 'interrupted'}; {_continue_hint(args)}", file=sys.stderr)
        return 128 + signal.SIGTERM if term else 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that both stop a command alike."""


_MAIN_PID: list[int] = []


def _terminated(signum: int, frame: object) -> None:
    if _MAIN_PID and os.getpid() != _MAIN_PID[-1]:  # a forked child (a DataLoader worker): the default action
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM raises :class:`Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _MAIN_PID.append(os.getpid())
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _MAIN_PID.pop()


def _committed_nothing(args: argparse.Namespace) -> bool:
    """True when ``asg train``'s run folder holds no checkpoint (a resume would be refused)."""
    from asg.engine.rundir.folder import RunDir

    try:
        out = args.out
        if out is None:
            from asg.api import default_run_dir
            from asg.config import load_config

            out = default_run_dir(load_config(args.config, args.overrides))
        return not RunDir(out).has_progress()
    except Exception:  # the advice is best effort: the usual one
        return False


def _continue_hint(args: argparse.Namespace) -> str:
    """How to continue an interrupted command."""
    if args.command == "data":
        if args.data_command == "prepare":
            return "rerun the same command to continue (labels already converted and recorded are kept)"
        return "rerun the same command"
    if args.command in ("evaluate", "demo", "predict", "export", "sweep", "compare"):
        return "rerun the same command"
    if args.command == "train" and _committed_nothing(args):
        return "no checkpoint was written yet, so there is nothing to resume: rerun the same command without --resume"
    return "continue with the same command and --resume"


if __name__ == "__main__":
    sys.exit(main())
