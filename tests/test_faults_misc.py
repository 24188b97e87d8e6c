"""Faults of run folders, checkpoints and messages (issue 18: cases 7, 11, 13, 14, 15, 17)."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import copy_run

import asg

SRC_DIR = str(Path(asg.__file__).resolve().parents[1])
TESTS_DIR = str(Path(__file__).resolve().parent)

# ``asg train`` (the CLI's main) on the tests' tiny data (helpers.tiny_data), under a file-size limit given as argv[2]
LIMITED_TRAIN = textwrap.dedent(f"""
    import resource, sys
    sys.path.insert(0, {TESTS_DIR!r})
    import torch
    from helpers import TINY_OVERRIDES, tiny_data
    from asg import cli
    import asg.engine.trainer
    torch.set_num_threads(1)
    bundle = tiny_data()
    asg.engine.trainer.build_data = lambda cfg: bundle
    limit = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    sets = [a for o in TINY_OVERRIDES + sys.argv[3:] for a in ("--set", o)]
    sys.exit(cli.main(["train", "--config", sys.argv[1] + "/recipe.yaml", "--out", sys.argv[1] + "/run", *sets]))
""")


def limited_train(folder: Path, limit: int, *overrides: str) -> subprocess.CompletedProcess:
    folder.mkdir(exist_ok=True)
    (folder / "recipe.yaml").write_text("name: tiny\n")
    env = {**os.environ, "PYTHONPATH": SRC_DIR}
    argv = [sys.executable, "-c", LIMITED_TRAIN, str(folder), str(limit), "train.progress=false", *overrides]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_file_size_limit_at_a_checkpoint_is_one_message(tmp_path):
    """Case 7: ``ulimit -f`` below a checkpoint's size: one line, exit 2, no traceback."""
    proc = limited_train(tmp_path, 64 << 10)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(err) == 1, proc.stderr
    assert err[0].startswith("asg: error: cannot write") and "ulimit -f" in err[0] and "--resume" in err[0]
    assert "no checkpoint had been written yet" in err[0]
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_torch_save_write_failure_is_one_message_and_the_last_checkpoint_is_kept(tmp_path, monkeypatch):
    """Case 7, the trainer-state file: torch.save hides the OSError in a RuntimeError."""
    import torch

    from asg.engine.rundir import weights as checkpoint
    from asg.engine.rundir.folder import RunDir
    from asg.engine.rundir.lock import RunFolderError

    rd = RunDir(tmp_path)
    weights = {"w": torch.zeros(3)}
    with rd:
        rd.save_checkpoint(2, weights, {"x": 1}, {}, None)

        def full(obj, f):
            Path(f).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 832 vs 768")

        monkeypatch.setattr(checkpoint.torch, "save", full)
        kept = r"cannot write .*step_0000004.state.pt .*checkpoint of step 2 is kept"
        with pytest.raises(RunFolderError, match=kept):
            rd.save_checkpoint(4, weights, {"x": 2}, {}, None)
        monkeypatch.undo()
        assert rd.load_checkpoint()[0]["step"] == 2
    assert not list(tmp_path.rglob("*.tmp"))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC_DIR}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_no_temporary_file(tmp_path):
    """Case 14: SIGKILL while the weights file is being written; the next open of the folder cleans it."""
    proc = _run(
        """
        import os, signal, sys, torch
        import asg.engine.rundir.weights as c
        from asg.engine.rundir.folder import RunDir
        def dying(state, tmp, metadata=None):
            open(tmp, "wb").write(b"x" * 100_000)
            os.kill(os.getpid(), signal.SIGKILL)
        rd = RunDir(sys.argv[1])
        rd.lock()
        rd.save_checkpoint(2, {"w": torch.zeros(3)}, {}, {}, None)
        c.save_file = dying
        rd.save_checkpoint(4, {"w": torch.ones(3)}, {}, {}, None)
        """,
        str(tmp_path),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list((tmp_path / "checkpoints").glob(".*.tmp"))) == 1
    from asg.engine.rundir.folder import RunDir

    with RunDir(tmp_path) as rd:
        assert not list(tmp_path.rglob("*.tmp"))
        assert rd.load_checkpoint()[0]["step"] == 2


@pytest.mark.slow
def test_lock_dies_with_its_process_not_with_its_forked_workers(tmp_path):
    """Case 13: kill -9 of a process whose forked child (a data worker) lives on: the folder is free at once."""
    proc = _run(
        """
        import os, signal, sys, time
        from asg.engine.rundir.folder import RunDir
        RunDir(sys.argv[1]).lock()
        child = os.fork()
        if child == 0:  # the worker: off the test's pipes, so that the test does not wait for it
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 1)
            os.dup2(null, 2)
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
        str(tmp_path),
    )
    child = int(proc.stdout.split()[0])
    try:
        assert proc.returncode == -signal.SIGKILL
        os.kill(child, 0)  # the orphaned worker is alive
        from asg.engine.rundir.folder import RunDir

        with RunDir(tmp_path):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


class Payload:
    """A pickled object (it would run code on load with weights_only=False)."""

    def __reduce__(self):
        return (print, ("payload ran",))


def test_refused_pickle_files_are_one_line_of_ours(tmp_path, capsys):
    """Case 15: backbone weights, trainer state and policy files holding pickled objects."""
    import torch

    from asg.engine.rundir.weights import load_state
    from asg.errors import AsgError
    from asg.l2o.policy import _read_state
    from asg.models.backbones import load_state_dict_file

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Payload()}, path)
    for load in (load_state_dict_file, load_state, _read_state):
        with pytest.raises(AsgError) as info:
            load(path)
        msg = str(info.value)
        assert "\n" not in msg and "weights_only" not in msg and "pickled Python object (print)" in msg
        assert str(path) in msg
    assert "payload ran" not in capsys.readouterr().out


def test_inferred_classes_warn_about_an_off_by_one_top_label(tmp_path):
    """Case 17: labels 0..2 with 20 images each, one image labelled 3: a fourth class, silently."""
    import numpy as np
    from PIL import Image

    from asg.config import DataConfig
    from asg.data.bundle import DataWarning
    from asg.data.check import check_listfile
    from asg.data.classification.listfile import build_listfile

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    lines = [f"x.png {c}" for c in range(3) for _ in range(20)] + ["x.png 3"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(name="listfile", train_list=str(tmp_path / "train.txt"), image_size=8, source_val_fraction=0.0)
    with pytest.warns(DataWarning, match=r"inferred as 4 from the highest label 3, which has only 1 image"):
        assert len(build_listfile(cfg).class_names) == 4
    assert any("off-by-one" in w for w in check_listfile(tmp_path / "train.txt").warnings)
    assert not any("off-by-one" in w for w in check_listfile(tmp_path / "train.txt", num_classes=4).warnings)


@pytest.mark.slow
def test_evaluate_while_the_training_commits_and_deletes_the_checkpoint(tiny_bundle, tmp_path, monkeypatch, erm_run):
    """Case 11: `asg evaluate` on a running training whose next checkpoint deletes the file it looked up."""
    import shutil

    import asg.data
    from asg.api import evaluate
    from asg.engine.rundir.folder import RunDir

    run = copy_run(erm_run, tmp_path / "run")  # its checkpoint is replaced below
    rd = RunDir(run)
    manifest = rd.read_manifest()
    looked_up = run / manifest["weights"]["file"]

    def slow_data(cfg):  # the trainer commits step 6 (and deletes the step-4 files) while the data is built
        new = run / "checkpoints" / "step_0000006.safetensors"
        shutil.copyfile(looked_up, new)
        with RunDir(run) as writer:
            writer.commit({**manifest, "step": 6, "weights": writer._entry(new, 6)})
        assert not looked_up.exists()
        return tiny_bundle

    monkeypatch.setattr(asg.data, "build_data", slow_data)
    result = evaluate(run, "last", show_progress=False)
    assert result["checkpoint_file"] == str(looked_up) and set(result["sets"]) == {"source_val", "real"}
