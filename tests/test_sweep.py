"""Sweeps on Optuna (asg.tuning): search spaces, reproducible trials, ASHA, journal and PostgreSQL workers, dead
workers, torchrun."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from PIL import Image
from safetensors.torch import load_file

from asg.config import load_config
from asg.errors import ConfigError
from asg.methods import METHODS
from asg.methods.space import Knob
from asg.tuning import Study, SweepSpec, run_workers, sweep
from asg.tuning.space import check_knob, method_knobs

# a trial: 6 steps, evaluated every 2 (ASHA's rungs at 2 and 6 with reduction factor 3)
TINY = [
    "train.steps=6",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.progress=false",
    "optim.warmup_steps=0",
    "eval.retention=false",
    "eval.full_eval_selected=false",
]


def _image_folder(root: Path) -> None:
    """Three classes of coloured squares (12 training and 3 real images each), noisy enough to differ."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("real", 3)):
        for label, color in enumerate(((10, 10, 200), (200, 10, 10), (10, 200, 10))):
            for i in range(n):
                path = root / split / f"c{label}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                noise = (torch.rand(16, 16, 3, generator=g) * 120).to(torch.uint8).numpy()
                img = Image.fromarray(noise + torch.tensor(color, dtype=torch.uint8).numpy() // 2)
                img.save(path)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sweep_data")
    _image_folder(root / "images")
    cfg = {
        "data": {
            "name": "imagefolder",
            "root": str(root / "images"),
            "image_size": 32,
            "batch_size": 6,
            "eval_batch_size": 16,
            "source_val_fraction": 0.25,
        },
        "method": {"name": "erm"},
        "optim": {"lr": 0.05},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _trials(folder: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage).get_trials()


# ---------------------------------------------------------------- search spaces


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_space_is_declared_once_and_matches_the_config_schema(name):
    cfg = load_config(None, [f"method.name={name}", "train.steps=1200"])
    knobs = method_knobs(cfg)
    keys = [k.key for k in knobs]
    assert keys[:2] == ["optim.lr", "optim.backbone_lr_mult"]  # the backbone rate is a knob of every method
    assert len(set(keys)) == len(keys)
    for knob in knobs:
        check_knob(knob, cfg)
    assert keys[2:] == [k.key for k in METHODS[name].knobs]


def test_space_refuses_keys_outside_the_schema_and_wrong_types():
    cfg = load_config(None, [])
    with pytest.raises(ConfigError, match="not a numeric field"):
        check_knob(Knob("optim.no_such_rate", 0.1, 1.0, (0.5,)), cfg)
    with pytest.raises(ConfigError, match="not a numeric field"):
        check_knob(Knob("optim.schedule", 0.1, 1.0, (0.5,)), cfg)
    with pytest.raises(ConfigError, match="integer field"):
        check_knob(Knob("method.probe_steps", 1, 10, (5,)), cfg)


def test_lpft_probe_length_is_capped_by_the_run_length_and_ranges_narrow():
    cfg = load_config(None, ["method.name=lpft", "train.steps=100"])
    probe = method_knobs(cfg)[-1]
    assert probe.key == "method.probe_steps" and probe.high == 50 and max(probe.grid) <= 50
    lr = method_knobs(cfg, {"optim.lr": (0.01, 0.1, (0.01, 0.1))})[0]
    assert (lr.low, lr.high, lr.grid) == (0.01, 0.1, (0.01, 0.1))
    with pytest.raises(ConfigError, match="no knob 'method.kl_weight'"):
        method_knobs(cfg, {"method.kl_weight": (0.1, 1.0, (0.1,))})


# ---------------------------------------------------------------- one worker


@pytest.mark.slow
def test_trial_parameters_reproduce_bit_for_bit_as_asg_train(recipe, tmp_path, one_thread):
    from asg.cli import main

    result = sweep(recipe, tmp_path / "sweep", TINY, trials=1, sampler="random", pruner="none")
    best = result["best"]
    assert best is not None and best["trial"] == 0 and set(best["params"]) == {"optim.lr", "optim.backbone_lr_mult"}
    sets = [a for o in [*TINY, *best["overrides"], "name=tiny_sweep_trial0000"] for a in ("--set", o)]
    assert main(["train", "--config", recipe, "--out", str(tmp_path / "again"), *sets]) == 0
    a = load_file(next((tmp_path / "sweep" / "trials" / "0000").glob("last.safetensors")))
    b = load_file(next((tmp_path / "again").glob("last.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = yaml.safe_load((tmp_path / "sweep" / "trials" / "0000" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == best["params"]["optim.lr"]  # the float itself, not a rounded copy


@pytest.mark.slow
def test_tiny_study_prunes_deterministically_under_a_fixed_seed(recipe, tmp_path, one_thread):
    """One worker, then two (ASHA in trial order): the same trials pruned at the same steps."""
    outcomes = []
    for name, jobs in (("a", 1), ("b", 2)):
        result = sweep(
            recipe,
            tmp_path / name,
            TINY,
            trials=5,
            sampler="random",
            seed=3,
            study_name="same",
            min_resource=2,
            jobs=jobs,
            threads=1,  # as the one-worker study here (one_thread): the same floating-point sums
        )
        rows = sorted(result["rows"], key=lambda r: r["trial"])
        outcomes.append([(r["trial"], r["state"], r["steps"], r["params"], r["source_val"]) for r in rows])
    assert outcomes[0] == outcomes[1]
    states = [o[1] for o in outcomes[0]]
    assert "pruned" in states and "complete" in states
    pruned = next(r for r in result["rows"] if r["state"] == "pruned")
    note = json.loads(Path(pruned["folder"], "pruned.json").read_text())  # the folder stays and says why
    assert note["step"] == pruned["steps"] < 6 and "ASHA" in note["rule"] and "pruned at step" in pruned["stopped"]
    assert result["cost"]["steps_trained"] < result["cost"]["trials"] * 6


def test_storage_refuses_sqlite(recipe, tmp_path):
    with pytest.raises(ConfigError, match="SQLite"):
        Study(SweepSpec(recipe, tmp_path, TINY, storage=f"sqlite:///{tmp_path}/s.db"))


def test_grid_sampler_budget_is_the_grid(recipe, tmp_path):
    ranges = {"optim.lr": (0.01, 0.1, (0.01, 0.1)), "optim.backbone_lr_mult": (0.1, 1.0, (0.1, 1.0))}
    spec = SweepSpec(recipe, tmp_path, TINY, trials=50, sampler="grid", ranges=ranges)
    assert Study(spec).budget == 4


# ---------------------------------------------------------------- several workers


def _assert_whole(trials: list, budget: int) -> None:
    """No lost or repeated trial: ``budget`` finished trials, numbered 0.., with distinct parameters."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == budget, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    params = [tuple(sorted(t.params.items())) for t in finished]
    assert len(set(params)) == budget
    assert len({t.user_attrs["folder"] for t in finished}) == budget


@pytest.mark.slow
def test_two_workers_on_the_journal_file_finish_one_study(recipe, tmp_path):
    spec = SweepSpec(recipe, tmp_path, TINY, trials=4, sampler="random", study_name="journal")
    assert run_workers(spec, jobs=2) == []
    trials = _trials(tmp_path, "journal")
    _assert_whole(trials, 4)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials


def _worker_command(recipe: str, out: Path, name: str, overrides: list[str], trials: int, storage: str = "") -> list:
    code = (
        "from asg.tuning.spec import SweepSpec; from asg.tuning.study import run_worker; import torch; "
        "torch.set_num_threads(1); "
        f"run_worker(SweepSpec({recipe!r}, {str(out)!r}, {overrides!r}, trials={trials}, sampler='random', "
        f"study_name={name!r}, storage={storage or None!r}, heartbeat_s=1, grace_s=3))"
    )
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_a_study_the_next_worker_completes(recipe, tmp_path, capfd):
    long = [o for o in TINY if not o.startswith("train.steps")] + ["train.steps=20", "train.eval_every=10"]
    proc = subprocess.Popen(_worker_command(recipe, tmp_path, "killed", long, 2))
    folder = tmp_path / "trials" / "0000"
    deadline = time.time() + 120
    while not (folder / "checkpoint.json").exists():  # its first checkpoint
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    spec = SweepSpec(recipe, tmp_path, long, trials=2, sampler="random", study_name="killed")
    run_workers(spec, jobs=1)
    assert "trial 0 of killed: its worker" in capfd.readouterr().err  # one line says which trial was retried
    trials = _trials(tmp_path, "killed")
    dead = trials[0]
    assert dead.state == TrialState.FAIL
    retry = next(t for t in trials if t.user_attrs.get("retries") == [0])
    assert retry.params == dead.params and retry.user_attrs["folder"] == str(folder)
    assert retry.state == TrialState.COMPLETE
    _assert_whole([t for t in trials if t.number != 0], 2)
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]  # resumed from its checkpoint, not started again


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    return found


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of this test's own (initdb and pg_ctl in a temporary folder, trust auth, loopback)."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is missing: .ci/run installs Debian's postgresql")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="asg-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "asg"], check=True, capture_output=True)
    opts = f"-p {port} -k {folder} -h 127.0.0.1"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(folder / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://asg@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql_finish_one_study(recipe, tmp_path, postgres):
    procs = [subprocess.Popen(_worker_command(recipe, tmp_path / f"m{i}", "pg", TINY, 4, postgres)) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    study = optuna.load_study(study_name="pg", storage=postgres.replace("postgresql://", "postgresql+psycopg://"))
    trials = study.get_trials()
    _assert_whole(trials, 4)
    assert len({t.user_attrs["pid"] for t in trials}) == 2


@pytest.mark.slow
def test_torchrun_trials_sample_on_rank_zero_only(recipe, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(torchrun),
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        "-m",
        "asg",
        "sweep",
        "--config",
        recipe,
        "--out",
        str(tmp_path),
        "--trials",
        "2",
        "--sampler",
        "random",
        "--study-name",
        "ddp",
        "--set",
        "data.batch_size=6",
        *[a for o in TINY for a in ("--set", o)],
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = _trials(tmp_path, "ddp")
    _assert_whole(trials, 2)  # two ranks, yet each trial once
    assert len({t.user_attrs["pid"] for t in trials}) == 1  # asked by one process: rank 0
    for t in trials:  # trained by both processes, complete or pruned
        rows = Path(t.user_attrs["folder"], "results.jsonl").read_text().splitlines()
        assert rows and all(json.loads(row)["world_size"] == 2 for row in rows)
