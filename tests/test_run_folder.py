"""Runs that cannot be corrupted: lock, consistent checkpoints, history without repeats, guards, obeying resume."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY_OVERRIDES, CrashAt
from safetensors.torch import load_file

from asg.config import load_config
from asg.engine.evaluation.evaluator import Evaluator
from asg.engine.rundir.folder import TRAINING, RunDir, RunKind
from asg.engine.rundir.lock import RunFolderError
from asg.engine.trainer import Trainer
from asg.errors import AsgError, ConfigError, TrainingDiverged

TESTS = Path(__file__).parent


def _weights(path):
    return load_file(path)


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"differs at {k}"


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_second_process_into_a_locked_folder_is_refused_with_its_pid(tmp_path, tiny_bundle, tiny_config):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from asg.engine.rundir.folder import RunDir; r=RunDir(sys.argv[1]); "
            "r.lock(); print('locked', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
            Trainer(tiny_config(), tmp_path, data=tiny_bundle, quiet=True).fit()
        assert not (tmp_path / "results.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # the OS dropped the dead holder's lock
    Trainer(tiny_config(), tmp_path, data=tiny_bundle, quiet=True).fit()
    assert (tmp_path / "done").exists()


def test_lock_is_exclusive_within_one_process_and_released(tmp_path):
    with RunDir(tmp_path):
        with pytest.raises(RunFolderError, match="in use"):
            RunDir(tmp_path).lock()
    with RunDir(tmp_path):
        pass


@pytest.mark.slow
def test_crash_between_checkpoint_files_and_manifest_resumes_exactly(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=6", "train.eval_every=1", "train.checkpoint_every=2")
    Trainer(cfg, tmp_path / "a", data=tiny_bundle, quiet=True).fit()

    commit = RunDir.commit

    def die_before_second_checkpoint(self, manifest):
        if manifest["step"] == 4 and "weights" in manifest and manifest["evaluated_through"] == 3:
            raise KeyboardInterrupt  # step 4's weights and state are on disk, the manifest is not
        return commit(self, manifest)

    monkeypatch.setattr(RunDir, "commit", die_before_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "b", data=tiny_bundle, quiet=True).fit()
    monkeypatch.setattr(RunDir, "commit", commit)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 2
    Trainer(cfg, tmp_path / "b", data=tiny_bundle, quiet=True, resume=True).fit()
    _same_weights(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")
    assert _steps(tmp_path / "b") == [1, 2, 3, 4, 5, 6]
    leftovers = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert leftovers == sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())


@pytest.mark.slow
def test_mismatched_checkpoint_files_are_refused(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=6")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True, callbacks=[CrashAt(5)]).fit()
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    weights = tmp_path / manifest["weights"]["file"]
    state = load_file(weights)
    state[next(iter(state))] += 1  # weights from "another step"
    from safetensors.torch import save_file

    save_file(state, weights)
    with pytest.raises(RunFolderError, match="checksum"):
        Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True, resume=True).fit()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    sys.path.insert(0, sys.argv[2])
    from helpers import CrashAt, tiny_data
    from asg.config import load_config
    from asg.engine.trainer import Trainer
    torch.set_num_threads(1)
    cfg = load_config(None, sys.argv[3:])
    Trainer(cfg, sys.argv[1], data=tiny_data(), quiet=True, callbacks=[CrashAt(5, kill=True)]).fit()
    """
)


@pytest.mark.slow
def test_kill_9_then_resume_writes_each_step_once(tiny_bundle, tiny_config, tmp_path, one_thread):
    overrides = ["train.steps=7", "train.eval_every=1", "train.checkpoint_every=3"]
    cfg = tiny_config(*overrides)
    Trainer(cfg, tmp_path / "a", data=tiny_bundle, quiet=True).fit()

    script = tmp_path / "die.py"
    script.write_text(KILL_SCRIPT)
    argv = [sys.executable, str(script), str(tmp_path / "b"), str(TESTS), *TINY_OVERRIDES, *overrides]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _steps(tmp_path / "b") == [1, 2, 3, 4, 5]  # rows 4 and 5 are past the step-3 checkpoint
    Trainer(cfg, tmp_path / "b", data=tiny_bundle, quiet=True, resume=True).fit()
    assert _steps(tmp_path / "b") == [1, 2, 3, 4, 5, 6, 7]
    _same_weights(tmp_path / "a" / "last.safetensors", tmp_path / "b" / "last.safetensors")
    _same_weights(tmp_path / "a" / "best_oracle.safetensors", tmp_path / "b" / "best_oracle.safetensors")


@pytest.mark.slow
def test_rerun_over_a_run_that_never_checkpointed_starts_afresh(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=4", "train.eval_every=1", "train.checkpoint_every=4")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True, callbacks=[CrashAt(2)]).fit()
    assert _steps(tmp_path) == [1, 2] and not (tmp_path / "checkpoint.json").exists()
    Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True).fit()
    assert _steps(tmp_path) == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_failed_evaluation_does_not_cost_the_checkpoint_and_is_redone_on_resume(
    tiny_bundle, tiny_config, tmp_path, monkeypatch
):
    cfg = tiny_config("train.steps=4", "train.eval_every=2", "train.checkpoint_every=2")
    Trainer(cfg, tmp_path / "a", data=tiny_bundle, quiet=True).fit()
    original = Evaluator.evaluate

    calls = []

    def broken(self, sets):
        calls.append(len(sets))
        if len(calls) == 1:  # the run's first evaluation: that of step 2
            raise OSError("a bad image in the real set")
        return original(self, sets)

    monkeypatch.setattr(Evaluator, "evaluate", broken)
    with pytest.raises(OSError):
        Trainer(cfg, tmp_path / "b", data=tiny_bundle, quiet=True).fit()
    manifest = json.loads((tmp_path / "b" / "checkpoint.json").read_text())
    assert manifest["step"] == 2 and manifest["evaluated_through"] is None  # saved before evaluating
    monkeypatch.setattr(Evaluator, "evaluate", original)
    Trainer(cfg, tmp_path / "b", data=tiny_bundle, quiet=True, resume=True).fit()
    assert _steps(tmp_path / "b") == [2, 4]
    _same_weights(tmp_path / "a" / "best_source_val.safetensors", tmp_path / "b" / "best_source_val.safetensors")


@pytest.mark.slow
def test_finite_loss_explosion_stops_and_keeps_the_previous_checkpoint(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=30", "train.eval_every=100", "train.checkpoint_every=5")
    trainer = Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True)
    loss = trainer.method.loss

    def exploding(out, labels, teacher_logits):
        lo = loss(out, labels, teacher_logits)
        if trainer.step >= 17:
            lo.loss = lo.loss * 1e20  # finite, but exploded
        return lo

    monkeypatch.setattr(trainer.method, "loss", exploding)
    with pytest.raises(TrainingDiverged, match=r"exploding loss \(1000 x .*\) at step 18"):
        trainer.fit()
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    assert manifest["step"] == 15
    assert not (tmp_path / "done").exists()


@pytest.mark.slow
def test_exploded_weights_are_never_checkpointed(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=30", "train.eval_every=100", "train.checkpoint_every=5")
    trainer = Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True)
    step = trainer.optimizer.step

    def blow_up(*args, **kwargs):
        step(*args, **kwargs)
        if trainer.step == 9:  # the update of step 10, right before its checkpoint
            with torch.no_grad():
                for p in trainer.model.head.parameters():
                    p.mul_(1e27)

    monkeypatch.setattr(trainer.optimizer, "step", blow_up)
    with pytest.raises(TrainingDiverged, match="weights to be saved at step 10"):
        trainer.fit()
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 5
    saved = load_file(tmp_path / "last.safetensors")
    assert max(float(v.abs().max()) for v in saved.values() if v.is_floating_point()) < 1e6


@pytest.mark.slow
def test_resume_applies_a_changed_learning_rate(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=4", "optim.schedule=constant")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True, callbacks=[CrashAt(3)]).fit()
    saved = tmp_path / "config.yaml"
    resumed = Trainer(load_config(saved, ["optim.lr=0.002"]), tmp_path, data=tiny_bundle, quiet=True, resume=True)
    resumed.fit()
    head = resumed.optimizer.param_groups[-1]
    assert head["base_lr"] == pytest.approx(0.002) and head["lr"] == pytest.approx(0.002)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.002 * cfg.optim.backbone_lr_mult)
    assert load_config(saved).optim.lr == pytest.approx(0.002)  # the folder records the value used
    change = json.loads((tmp_path / "resumes.jsonl").read_text())
    assert change["step"] == 2 and change["changes"]["optim.lr"] == [0.05, 0.002]


@pytest.mark.slow
def test_resume_refuses_a_change_that_makes_another_experiment(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=4")
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True, callbacks=[CrashAt(3)]).fit()
    for override, key in (
        ("method.name=erm", "method.name"),
        ("train.seed=5", "train.seed"),
        ("train.steps=2", "train.steps"),
    ):
        with pytest.raises(ConfigError, match=key):
            Trainer(
                load_config(tmp_path / "config.yaml", [override]), tmp_path, data=tiny_bundle, quiet=True, resume=True
            ).fit()


@pytest.mark.slow
def test_full_disk_keeps_the_previous_checkpoint(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=4")
    trainer = Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True)
    import asg.engine.rundir.weights as checkpoint

    save = checkpoint.save_file

    def full(tensors, path, metadata=None):
        if trainer.step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(RunFolderError, match="disk is full.*checkpoint of step 2 is kept"):
        trainer.fit()
    monkeypatch.setattr(checkpoint, "save_file", save)
    Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True, resume=True).fit()  # resumable from step 2
    assert (tmp_path / "done").exists()


def test_unwritable_output_folder_is_one_message(tiny_bundle, tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunFolderError, match=f"cannot create {blocker}/run"):
        Trainer(tiny_config(), blocker / "run", data=tiny_bundle, quiet=True).fit()


def test_loss_guard_catches_an_early_explosion_but_not_noise_after_convergence():
    from asg.engine.guards import LossGuard

    guard = LossGuard(1000.0)
    for loss in (1.14, 45.0):
        assert not guard.exploded(loss)
        guard.update(loss)
    assert guard.exploded(2.2e4)  # 1.14 -> 45 -> 2.2e4: a running average would have followed it up
    calm = LossGuard(1000.0)
    for loss in [2.3] + [1e-4] * 50:
        calm.update(loss)
    assert not calm.exploded(5.0) and calm.exploded(float("inf"))
    assert not LossGuard(None).exploded(1e30) and LossGuard(None).exploded(float("nan"))


def test_batch_norm_training_never_gets_a_one_image_batch():
    from asg.engine.sampler import EpochBatchSampler

    sizes = [len(b) for b in EpochBatchSampler(17, 8, seed=0, total_steps=6, min_batch=2)]
    assert sizes == [8, 8] * 3
    assert [len(b) for b in EpochBatchSampler(17, 8, seed=0, total_steps=3)] == [8, 8, 1]


def test_begin_refuses_a_finished_run_with_or_without_resume(tmp_path):
    with RunDir(tmp_path) as rd:
        rd.save_checkpoint(2, {"w": torch.zeros(2)}, {}, {}, None)
        rd.finish()
        assert rd.is_done() and (tmp_path / "done").read_text().strip()
        assert not list(tmp_path.glob(".done.*"))  # written whole, through a temporary file
        for resume in (False, True):
            with pytest.raises(AsgError, match=r"already finished .*remove its 'done' file and pass --resume"):
                rd.begin(resume)


def test_begin_refuses_progress_without_resume_and_resumes_it(tmp_path):
    with RunDir(tmp_path) as rd:
        rd.save_checkpoint(2, {"w": torch.zeros(2)}, {}, {}, None)
        with pytest.raises(AsgError, match=r"holds a run already: pass --resume to continue it"):
            rd.begin(False)
        assert rd.begin(True) == [] and rd.has_progress()  # nothing removed: the caller restores
        kind = RunKind(noun="adaptation", markers=("start.json",), missing=None)
        (tmp_path / "start.json").write_text("{}")
        with pytest.raises(AsgError, match=r"holds an adaptation that stopped in round 2 at step 4: pass --resume"):
            rd.begin(False, kind, where="round 2 at step 4")


def test_begin_clears_the_leftovers_of_a_run_without_progress(tmp_path):
    (tmp_path / "tb").mkdir()
    (tmp_path / "results.jsonl").write_text('{"step": 2}\n')
    (tmp_path / "config.yaml").write_text("name: kept\n")
    with RunDir(tmp_path) as rd:
        with pytest.raises(AsgError, match=r"cannot resume: .*checkpoint.json does not exist \(no checkpoint"):
            rd.begin(True)
        assert (tmp_path / "results.jsonl").exists()  # a refused resume removes nothing
        removed = rd.begin(False)
        assert removed == ["results.jsonl", "tb/"] and (tmp_path / "config.yaml").exists()
        note = TRAINING.fresh_note(tmp_path, removed)
        assert "stopped before its first checkpoint; removed its results.jsonl, tb/ and starting afresh" in note
        lenient = RunKind(noun="adaptation", markers=("start.json",), missing=None, leftovers=("x.txt",))
        (tmp_path / "x.txt").write_text("")
        assert rd.begin(True, lenient) == ["x.txt"]  # a resume with nothing to resume starts afresh


def test_saved_config_and_rows_read_back_tolerantly(tmp_path):
    cfg = load_config(None, ["train.steps=7"])
    rd = RunDir(tmp_path / "run")
    with pytest.raises(AsgError, match="is not a run folder"):
        rd.read_config()
    with rd:
        rd.write_config(cfg)
        rd.append_row({"step": 1})
    assert rd.read_config(["train.seed=3"]).train.steps == 7
    with open(tmp_path / "run" / "results.jsonl", "a") as f:
        f.write('\n[1, 2]\n{"step": 2, "cut by a cra')  # a blank line, a non-row, a line cut mid-write
    assert rd.read_rows() == [{"step": 1}]
    assert rd.read_json("missing.json") is None
