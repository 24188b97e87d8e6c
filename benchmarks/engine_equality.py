"""Do two versions of the engine train alike? Fingerprint a set of short runs, then compare another version's.

    # with the old version (e.g. a checkout of the previous release on PYTHONPATH):
    PYTHONPATH=/old/src python benchmarks/engine_equality.py record eq.json --work /tmp/eq_old
    # with this one:
    python benchmarks/engine_equality.py compare eq.json --work /tmp/eq_new

The runs (short, CPU): a digits ASG run, an L2O run, a digit-scenes run, an adaptation of the ASG run, a
``kill -9`` during a run and ``--resume``, and a 2-process ``torchrun`` run. A fingerprint holds the sha256 of
every weight tensor of every checkpoint file, the result rows (wall times dropped) and the selections of
``summary.json``. ``record`` also keeps the killed run folder as the old version left it; ``compare`` resumes
that folder with the current version (a run folder of the previous release resumes) and requires the result
of the uninterrupted run. Every comparison must be bit-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TINY = ["train.progress=false", "data.eval_max_per_set=48", "data.num_workers=0"]
DIGITS = ["data.num_train=320", "train.steps=12", "train.eval_every=4", "train.checkpoint_every=4", *TINY]
RUNS: dict[str, list[str]] = {
    "digits_asg": ["train", "--config", "digits_asg", *(f"--set={s}" for s in DIGITS)],
    "digits_l2o": ["train", "--config", "digits_asg_l2o", *(f"--set={s}" for s in DIGITS), "--set=l2o.min_steps=3"],
    "scenes_erm": [
        "train",
        "--config",
        "digit_scenes_erm",
        *(
            f"--set={s}"
            for s in [
                "data.num_train=48",
                "train.steps=6",
                "train.eval_every=3",
                "train.checkpoint_every=3",
                "data.batch_size=8",
                *TINY,
            ]
        ),
    ],
}
DROP = {"elapsed_s", "timing", "wall_s", "seconds", "time", "started", "finished"}


def _tensor_hashes(path: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()[:16] for k, v in load_file(path).items()}


def _clean(value: Any, work: str) -> Any:
    """``value`` without wall times, and with the work folder's path replaced (runs of two versions live apart)."""
    if isinstance(value, dict):
        return {k: _clean(v, work) for k, v in value.items() if k not in DROP}
    if isinstance(value, list):
        return [_clean(v, work) for v in value]
    return value.replace(work, "<work>") if isinstance(value, str) else value


def fingerprint(run: Path) -> dict[str, Any]:
    """Weights of every checkpoint file, result rows and selections of a finished run folder."""
    work = str(run.parent)
    out: dict[str, Any] = {"weights": {}}
    for f in sorted(run.rglob("*.safetensors")):
        out["weights"][str(f.relative_to(run))] = _tensor_hashes(f)
    for name in ("results.jsonl", "rounds.jsonl"):
        if (run / name).is_file():
            out[name] = [
                _clean(json.loads(line), work) for line in (run / name).read_text().splitlines() if line.strip()
            ]
    if (run / "summary.json").is_file():
        summary = json.loads((run / "summary.json").read_text())
        out["selections"] = _clean(summary.get("selections"), work)
        out["controller_history"] = _clean(summary.get("controller_history"), work)
    if (run / "adaptation.json").is_file():
        out["adaptation"] = _clean(json.loads((run / "adaptation.json").read_text()), work)
    return out


def asg(args: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "asg", *args], check=True, env=env)


def kill_during(args: list[str], run: Path, after_step: int) -> None:
    """Start ``asg`` and kill -9 it once the checkpoint of ``after_step`` is on disk."""
    proc = subprocess.Popen([sys.executable, "-m", "asg", *args])
    manifest = run / "checkpoint.json"
    while proc.poll() is None:
        if manifest.is_file():
            try:
                if json.loads(manifest.read_text()).get("step", 0) >= after_step:
                    break
            except json.JSONDecodeError:
                pass
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (run / "done").exists():
        raise SystemExit(f"the run in {run} finished before it could be killed; nothing was resumed")


def run_all(work: Path, keep_killed: Path | None) -> dict[str, dict[str, Any]]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prints: dict[str, dict[str, Any]] = {}
    for name, args in RUNS.items():
        asg([*args, "--out", str(work / name)])
        prints[name] = fingerprint(work / name)
    asg(
        [
            "adapt",
            "--config",
            "digits_cbst",
            "--from",
            str(work / "digits_asg"),
            "--out",
            str(work / "adapt"),
            "--set=adapt.rounds=1",
            "--set=adapt.steps_per_round=4",
            "--set=data.num_train=320",
            *(f"--set={s}" for s in TINY),
        ]
    )
    prints["adapt"] = fingerprint(work / "adapt")
    killed = work / "killed"
    kill_during([*RUNS["digits_asg"], "--out", str(killed)], killed, after_step=4)
    if keep_killed is not None:
        shutil.rmtree(keep_killed, ignore_errors=True)
        shutil.copytree(killed, keep_killed)
    asg([*RUNS["digits_asg"], "--out", str(killed), "--resume"])
    prints["kill9_resume"] = fingerprint(killed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m", "asg"]
    subprocess.run([*torchrun, *RUNS["digits_asg"], "--out", str(work / "torchrun2")], check=True, env=env)
    prints["torchrun2"] = fingerprint(work / "torchrun2")
    return prints


def compare(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        diffs = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b))]
        return diffs + [d for k in sorted(set(a) & set(b)) for d in compare(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in compare(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {str(a)[:80]} != {str(b)[:80]}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["record", "compare"])
    parser.add_argument("fingerprints", type=Path)
    parser.add_argument("--work", type=Path, default=Path("runs/engine_equality"))
    args = parser.parse_args()
    old_folder = args.fingerprints.with_suffix(".killed_run")
    if args.mode == "record":
        prints = run_all(args.work, keep_killed=old_folder)
        args.fingerprints.write_text(json.dumps(prints, indent=1))
        print(f"recorded {len(prints)} runs in {args.fingerprints} (the killed run folder kept in {old_folder})")
        return
    recorded = json.loads(args.fingerprints.read_text())
    prints = run_all(args.work, keep_killed=None)
    old_run = args.work / "previous_release_resumed"
    shutil.copytree(old_folder, old_run)
    asg([*RUNS["digits_asg"], "--out", str(old_run), "--resume"])
    prints["previous_release_folder_resumed"] = fingerprint(old_run)
    recorded["previous_release_folder_resumed"] = recorded["kill9_resume"]
    failed = False
    for name, expected in recorded.items():
        diffs = compare(expected, prints.get(name))
        failed |= bool(diffs)
        tensors = sum(len(v) for v in expected.get("weights", {}).values())
        rows = len(expected.get("results.jsonl", []))
        print(
            f"{name:34s} {'identical' if not diffs else 'DIFFERENT'}  ({tensors} weight tensors, {rows} result rows, "
            f"{len(expected.get('selections') or {})} selections)"
        )
        for d in diffs[:10]:
            print("    " + d)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
