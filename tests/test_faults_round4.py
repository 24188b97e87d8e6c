"""Fault-test findings, round 4 (issue 27): each case runs the real thing (a replaced base weight file at the same
path, a symlink loop, a float TIFF, a SIGTERM to ``asg train``, a kill -9 of a pool worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import asg
from asg import cli

SRC_DIR = str(Path(asg.__file__).resolve().parents[1])
TESTS_DIR = str(Path(__file__).resolve().parent)


def _image_folder(root: Path, per_class: int = 6, size: int = 28, splits=("train", "real")) -> Path:
    """``root/<split>/<class>/*.png``: classes a, b, c told apart by a bright patch's position."""
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate("abc"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
                img[:6, 8 * c : 8 * c + 8] = 255
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


# ---------------------------------------------------------------- 1. the base weight file of a LoRA run


def _lora_recipe(tmp_path: Path) -> tuple[Path, Path]:
    """A recipe of a tiny DINOv2 + LoRA run on an image folder, and its backbone weight file."""
    from helpers import dinov2_files

    backbone, head = dinov2_files(tmp_path)
    data = _image_folder(tmp_path / "images")
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(
        textwrap.dedent(f"""
        name: lora
        data: {{name: imagefolder, root: {data}, image_size: 28, batch_size: 6, source_val_fraction: 0.2}}
        model: {{backbone: dinov2_vits14, weights: {backbone}, guidance_file: {head}, lora_rank: 2,
                 timm_kwargs: {{depth: 4, embed_dim: 64, num_heads: 2}}, input_size: 28, channels_last: false}}
        method: {{name: asg, kl_weight: 1.0}}
        optim: {{lr: 0.05, warmup_steps: 0}}
        train: {{steps: 4, eval_every: 2, checkpoint_every: 2, progress: false}}
        eval: {{retention: false}}
    """)
    )
    return recipe, Path(backbone)


def _replace_with_other_weights(path: Path) -> None:
    """Another backbone file of the same layout at the same path (as a re-download of another release does)."""
    state = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    torch.save({k: torch.randn_like(v) * 0.02 if v.is_floating_point() else v for k, v in state.items()}, path)


@pytest.mark.slow
def test_a_lora_run_refuses_a_replaced_base_weight_file(tmp_path, capsys, one_thread):
    """Issue 27.1: the LoRA checkpoint holds adapters and head only; with another file at model.weights' path,
    evaluate, resume, WiSE-FT and predict refuse and name the file and both fingerprints."""
    pytest.importorskip("peft")
    import shutil

    recipe, backbone = _lora_recipe(tmp_path)
    run, stopped = tmp_path / "run", tmp_path / "stopped"
    assert cli.main(["train", "--config", str(recipe), "--out", str(run)]) == 0
    shutil.copytree(run, stopped)  # a run to resume: the same run without its 'done'
    (stopped / "done").unlink()
    assert cli.main(["evaluate", str(run)]) == 0  # the same file: evaluates
    capsys.readouterr()
    _replace_with_other_weights(backbone)
    for argv in (
        ["evaluate", str(run)],
        ["evaluate", str(run), "--wise-ft", "0.5"],
        ["train", "--resume", "--out", str(stopped)],
        ["predict", str(run), str(tmp_path / "images" / "real" / "a"), "--out", str(tmp_path / "p")],
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("asg: error: "), (argv, err)
        assert f"model.weights {backbone} changed since the run started" in err[0], err[0]
        assert "SHA-256" in err[0] and "bytes" in err[0]
    assert not list((tmp_path / "p").glob("predictions*"))
    recorded = (run / "base_weights.json").read_text()
    assert "sha256" in recorded and str(backbone) in recorded


def test_wise_ft_of_a_full_fine_tuning_run_refuses_a_replaced_pretrained_endpoint(tmp_path):
    """Issue 27.1: WiSE-FT's pretrained endpoint is rebuilt from model.weights for every run, LoRA or not."""
    import shutil

    from asg.config import ModelConfig
    from asg.errors import WeightsError
    from asg.models.base_weights import check_base_weights, record_base_weights

    path = tmp_path / "w.pth"
    torch.save({"x": torch.ones(3)}, path)
    shutil.copy(path, tmp_path / "moved.pth")
    cfg = ModelConfig(backbone="resnet50", weights=str(path))
    record = record_base_weights(cfg)
    check_base_weights(record, cfg, "WiSE-FT's pretrained endpoint")  # unchanged: nothing to say
    torch.save({"x": torch.zeros(3)}, path)  # same size, other bytes
    with pytest.raises(WeightsError, match=r"model.weights .*w.pth changed since the run started .*WiSE-FT"):
        check_base_weights(record, cfg, "WiSE-FT's pretrained endpoint")
    moved = ModelConfig(backbone="resnet50", weights=str(tmp_path / "moved.pth"))
    check_base_weights(record, moved, "evaluate")  # the original bytes elsewhere: accepted


# ---------------------------------------------------------------- 2. symlink loops in an image folder


def test_a_symlink_loop_is_followed_once_and_said(tmp_path, capsys):
    """Issue 27.2: ``train/a/up -> ..`` (a real loop): class a keeps its own 6 images, none of b's or c's, and the
    check and the dataset both say which link was not followed."""
    from asg.config import DataConfig
    from asg.data import build_data
    from asg.data.bundle import DataWarning

    root = _image_folder(tmp_path / "images")
    (root / "train" / "a" / "up").symlink_to("..")
    (root / "train" / "b" / "again").symlink_to("../b")  # a second path to the same folder (itself)
    assert cli.main(["data", "check", "imagefolder", str(root)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[lines.index("  train: 18 images, 0 empty") + 1].strip() == "a 6, b 6, c 6", out
    assert f"{root / 'train' / 'a' / 'up'} -> .." in out and "not followed" in out, out
    cfg = DataConfig(name="imagefolder", root=str(root), source_val_fraction=0.0, image_size=8)
    with pytest.warns(DataWarning, match=r"not followed .*train/a/up -> \.\."):
        bundle = build_data(cfg)
    assert len(bundle.train) == 18 and np.bincount(np.asarray(bundle.train.labels)).tolist() == [6, 6, 6]


def test_a_symlink_to_another_folder_is_still_followed(tmp_path):
    """A link to a folder outside the walk (images kept elsewhere) is read as before."""
    from asg.data.images import list_images

    elsewhere = _image_folder(tmp_path / "store", splits=("x",)) / "x" / "a"
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "linked").symlink_to(elsewhere)
    assert len(list_images(tmp_path / "cls")) == 6


# ---------------------------------------------------------------- 3. float images


def test_float_tiffs_are_scaled_by_their_range_and_nan_is_refused(tmp_path, capsys):
    """Issue 27.3: a float32 gray TIFF in [0, 1] (written by tifffile and by PIL) reads as its gray levels, not
    black; values up to 1e6 are scaled by their maximum, not saturated; NaN/Inf are refused naming the file,
    and ``data check --verify-images`` finds them."""
    import tifffile

    from asg.data.images import open_image
    from asg.errors import DataError

    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(8, 8)
    tifffile.imwrite(tmp_path / "unit.tif", ramp)
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit_pil.tif")
    tifffile.imwrite(tmp_path / "big.tif", ramp * 1e6)
    for name in ("unit.tif", "unit_pil.tif", "big.tif"):
        img = open_image(tmp_path / name)
        assert img.mode == "L"
        np.testing.assert_allclose(np.asarray(img, np.float64), np.rint(ramp * 255), atol=1, err_msg=name)
    bad = ramp.copy()
    bad[2, 3] = np.nan
    bad[4, 4] = np.inf
    tifffile.imwrite(tmp_path / "nan.tif", bad)
    with pytest.raises(DataError, match=r"nan.tif.*2 of 64 pixels are NaN or infinite"):
        open_image(tmp_path / "nan.tif")

    root = _image_folder(tmp_path / "images", per_class=2, splits=("train",))
    tifffile.imwrite(root / "train" / "a" / "nan.tif", bad)
    assert cli.main(["data", "check", "imagefolder", str(root)]) == 0  # no decoding without --verify-images
    capsys.readouterr()
    assert cli.main(["data", "check", "imagefolder", str(root), "--verify-images"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "nan.tif" in out and "NaN or infinite" in out, out


# ---------------------------------------------------------------- 4. an old key and its new name


def test_old_and_new_key_one_rule_the_later_wins_with_a_line_and_one_file_with_both_is_refused(tmp_path):
    """Issue 27.4: an old key and its new name: the one given later wins (a --set over a recipe, a recipe over the
    recipe it inherits) with a line naming both values; both in one recipe at different values is refused. The
    same rule for method.teacher_* and for train.amp/train.precision."""
    from asg.config import load_config
    from asg.errors import ConfigError
    from asg.recipe_files import ConfigWarning

    both = tmp_path / "both.yaml"
    both.write_text("method: {teacher_cache_storage: topk}\nteacher: {cache_storage: fp16}\n")
    with pytest.raises(
        ConfigError, match=r"method.teacher_cache_storage .*old name of teacher.cache_storage.*topk.*fp16"
    ):
        load_config(both)
    amp = tmp_path / "amp.yaml"
    amp.write_text("train: {amp: true, precision: fp32}\n")
    with pytest.raises(ConfigError, match=r"train.amp .*train.precision"):
        load_config(amp)

    new = tmp_path / "new.yaml"
    new.write_text("teacher: {cache_storage: fp16}\ntrain: {precision: fp32}\n")
    with pytest.warns(
        ConfigWarning,
        match=r"method.teacher_cache_storage=topk: .*old name of teacher.cache_storage; .*'topk' replaces 'fp16'",
    ):
        assert load_config(new, ["method.teacher_cache_storage=topk"]).teacher.cache_storage == "topk"
    with pytest.warns(
        ConfigWarning, match=r"train.amp=true: .*old name of train.precision; train.precision='bf16' replaces 'fp32'"
    ):
        assert load_config(new, ["train.amp=true"]).train.precision == "bf16"
    old = tmp_path / "old.yaml"
    old.write_text("method: {teacher_cache_storage: topk}\ntrain: {amp: true}\n")
    cfg = load_config(old, ["teacher.cache_storage=fp16", "train.precision=fp32"])  # the new names given later
    assert (cfg.teacher.cache_storage, cfg.train.precision) == ("fp16", "fp32")
    child = tmp_path / "child.yaml"  # a recipe over the one it inherits
    child.write_text("inherit: new.yaml\nmethod: {teacher_cache_storage: topk}\ntrain: {amp: true}\n")
    cfg = load_config(child)
    assert (cfg.teacher.cache_storage, cfg.train.precision) == ("topk", "bf16")


# ---------------------------------------------------------------- 5. non-finite weights and logits


def _official_resnet50_file(path: Path, poison: str | None) -> Path:
    """An official-layout VisDA classifier file (ResNet-50 + ``fc_new``) with ``poison``'s tensor all NaN."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    fc_new = torch.nn.Sequential(torch.nn.Linear(2048, 512), torch.nn.ReLU(), torch.nn.Linear(512, 3))
    state = {**net.state_dict(), **{f"fc_new.{k}": v for k, v in fc_new.state_dict().items()}}
    if poison is not None:
        state[poison] = torch.full_like(state[poison], float("nan"))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 50.0}, path)
    return path


@pytest.mark.slow
def test_an_official_file_with_nan_weights_is_refused_not_evaluated_at_chance(tmp_path, capsys):
    """Issue 27.5: `asg evaluate FILE --config RECIPE` of an official-layout file whose weights are NaN."""
    root = _image_folder(tmp_path / "images", per_class=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data: {{name: imagefolder, root: {root}, image_size: 32, source_val_fraction: 0.0}}\n"
        "model: {backbone: resnet50, weights: none, channels_last: false}\n"
    )
    official = _official_resnet50_file(tmp_path / "release" / "nan.pth.tar", "layer4.2.conv3.weight")
    assert cli.main(["evaluate", str(official), "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nan.pth.tar" in err[0] and "NaN" in err[0] and "layer4.2.conv3.weight" in err[0], err
    assert not list(official.parent.glob("eval_*.json"))


def test_non_finite_weights_are_refused_by_every_loader(tmp_path):
    """Issue 27.5: a backbone or guidance file (.pth, .safetensors), a checkpoint / init_from .safetensors and an
    L2O policy (release .pth, .safetensors) with NaN or Inf are refused naming the file and the tensor."""
    from safetensors.torch import save_file

    from asg.engine.rundir.weights import load_weights
    from asg.errors import WeightsError
    from asg.l2o.policy import LRPolicy, load_policy, save_policy
    from asg.models.base import load_state_dict_file

    state = {"a.weight": torch.ones(4, 4), "b.bias": torch.zeros(4)}
    state["b.bias"][1] = float("inf")
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        with pytest.raises(WeightsError, match=rf"{name} holds non-finite values .*b.bias \(1 Inf\)"):
            load_state_dict_file(tmp_path / name)
    model = torch.nn.Linear(4, 4)
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["weight"][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(WeightsError, match=r"ckpt.safetensors holds non-finite values .*weight \(1 NaN\)"):
        load_weights(model, tmp_path / "ckpt.safetensors")
    policy = LRPolicy(3)
    with torch.no_grad():
        policy.action_distribution.linear[0].weight[0, 0] = float("nan")
    save_policy(policy, tmp_path / "p.safetensors")
    torch.save(policy.state_dict(), tmp_path / "p.pth")
    for name in ("p.safetensors", "p.pth"):
        with pytest.raises(WeightsError, match=rf"{name} holds non-finite values .*action_distribution"):
            load_policy(tmp_path / name, 3)


def test_non_finite_evaluation_logits_are_refused(tmp_path):
    """Issue 27.5: a model whose logits are NaN (its weights went bad in memory) is not scored as class 0."""
    from helpers import RandomImages

    from asg.engine.evaluation.evaluate import evaluate
    from asg.errors import AsgError
    from asg.models.base import ModelOutput

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x):
            logits = self.fc(x.mean(dim=(2, 3)))
            return ModelOutput(logits, logits[:, :0], logits)

    net = Net()
    assert evaluate(net, RandomImages(8), 3, show_progress=False).confusion.sum() == 8
    with torch.no_grad():
        net.fc.bias[1] = float("nan")
    with pytest.raises(AsgError, match=r"eval real: the model's logits are NaN or infinite for 8 of 8 images"):
        evaluate(net, RandomImages(8), 3, show_progress=False, desc="eval real")


# ---------------------------------------------------------------- 6. the demo report of a resumed run


def test_demo_timing_sums_a_run_resumed_between_its_last_checkpoint_and_done(tiny_bundle, tiny_config, tmp_path):
    """Issue 27.6: a run stopped after its last checkpoint but before ``done`` resumes, trains 0 steps and records
    ``steps_per_s: null``; the demo report's timing sum takes it (it raised TypeError on every rerun)."""
    import json

    from asg.demo.report import runs_timing
    from asg.engine.callbacks import Callback
    from asg.engine.trainer import Trainer

    class StopAfterLastCheckpoint(Callback):
        def on_eval_end(self, trainer, row, results) -> None:
            if trainer.step == trainer.cfg.train.steps:
                raise KeyboardInterrupt("after the last checkpoint, before done")

    cfg = tiny_config()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "run", data=tiny_bundle, quiet=True, callbacks=[StopAfterLastCheckpoint()]).fit()
    assert not (tmp_path / "run" / "done").exists()
    Trainer(cfg, tmp_path / "run", data=tiny_bundle, quiet=True, resume=True).fit()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["timing"]["steps"] == 0 and summary["timing"]["steps_per_s"] is None
    full = json.loads(json.dumps(summary))
    full["timing"].update(steps=4, steps_per_s=2.0)
    timing = runs_timing([summary, full], train_wall_s=10.0)
    assert timing["runs"] == 2 and timing["steps"] == 4 and "steps_per_s" not in timing
    assert timing["train_step_s"] == round(summary["timing"]["train_step_s"] + full["timing"]["train_step_s"], 1)


# ---------------------------------------------------------------- 7. a dead worker of the demo's pool


def pool_task(folder: Path, die: bool) -> str:
    """A task of the worker-pool test (module level: spawned workers import it): writes ``folder``/done after a
    pause (as a run writes its folder); with ``die``, on its first attempt its process is killed by SIGKILL."""
    import time

    result = folder / "done"
    if result.exists():  # finished by an earlier attempt (as a finished run folder is read back)
        return result.read_text()
    folder.mkdir(exist_ok=True)
    attempt = folder / "tried"
    if die and not attempt.exists():
        attempt.write_text("1")
        time.sleep(0.5)  # the other worker is busy with its own task by now
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(1.0)
    result.write_text(f"{folder.name} by {os.getpid()}")
    return result.read_text()


@pytest.mark.slow
def test_a_worker_killed_by_sigkill_is_one_line_the_others_finish_and_the_rerun_completes(tmp_path, capsys):
    """Issue 27.7: kill -9 of one of two workers (``asg demo --jobs 2``'s pool): no BrokenProcessPool traceback
    and no lost work; one line names the task that died, every other task finishes in this call, and the rerun
    completes the missing one."""
    from asg.errors import AsgError
    from asg.workers import run_tasks, worker_pool

    tasks = [(tmp_path / name, name == "run_b") for name in ("run_a", "run_b", "run_c", "run_d")]
    with worker_pool(2):
        with pytest.raises(AsgError) as info:
            run_tasks(pool_task, tasks, 2)
        message = str(info.value)
        assert "\n" not in message and f"running {tmp_path / 'run_b'} died (killed by SIGKILL" in message, message
        assert "the other 3 task(s) finished" in message and "rerun the same command" in message
        assert sorted(p.parent.name for p in tmp_path.glob("*/done")) == ["run_a", "run_c", "run_d"]
        results = run_tasks(pool_task, tasks, 2)  # the rerun, in the same pool (a fresh worker replaced the dead)
    assert [r.split()[0] for r in results] == ["run_a", "run_b", "run_c", "run_d"]


@pytest.mark.slow
def test_an_error_in_a_task_still_stops_the_queue_and_is_raised(tmp_path):
    """A task's own error (not a dead worker) is raised as before, once the running tasks stop."""
    from asg.workers import run_tasks

    with pytest.raises(FileNotFoundError, match="No such file"):
        run_tasks(pool_task, [(tmp_path / "missing" / "x", False), (tmp_path / "b", False)], 2)


# ---------------------------------------------------------------- 8. the smaller findings


def test_the_off_by_one_top_label_warning_fires_for_one_image_against_eight(tmp_path):
    """Issue 27.8: labels 0..2 with 8 images each and one image labelled 3 (the case the warning was made for):
    the top class has <= 2 images and no evaluation set has it. Not when an evaluation set has it, nor for a
    small balanced set."""
    import warnings

    from asg.config import DataConfig
    from asg.data.bundle import DataWarning
    from asg.data.check import check_listfile
    from asg.data.classification.listfile import build_listfile

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    lines = [f"x.png {c}" for c in range(3) for _ in range(8)] + ["x.png 3"]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "real.txt").write_text("".join(f"x.png {c}\n" for c in range(3)))
    (tmp_path / "real4.txt").write_text("".join(f"x.png {c}\n" for c in range(4)))
    cfg = DataConfig(
        name="listfile",
        train_list=str(tmp_path / "train.txt"),
        image_size=8,
        source_val_fraction=0.0,
        eval_lists={"real": str(tmp_path / "real.txt")},
    )
    with pytest.warns(DataWarning, match=r"inferred as 4 from the highest label 3, which has only 1 image"):
        assert len(build_listfile(cfg).class_names) == 4
    assert any("off-by-one" in w for w in check_listfile(tmp_path / "train.txt").warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        build_listfile(DataConfig(**{**cfg.__dict__, "eval_lists": {"real": str(tmp_path / "real4.txt")}}))
        (tmp_path / "small.txt").write_text("".join(f"x.png {c}\n" for c in range(4) for _ in range(2)))
        build_listfile(DataConfig(**{**cfg.__dict__, "train_list": str(tmp_path / "small.txt"), "eval_lists": {}}))


def test_a_synthia_label_names_every_id_outside_its_ids(tmp_path):
    """Issue 27.8: a SYNTHIA label with ids 23 (undefined) and 1000 (beyond any table) names both, not 1000 only."""
    from asg.data.segmentation.pairs import LabelIdError, map_label
    from asg.data.segmentation.street_classes import synthia_lut

    raw = np.array([[0, 23], [1000, 5]], dtype=np.int64)
    with pytest.raises(LabelIdError, match=r"holds id\(s\) 23, 1000 outside SYNTHIA"):
        map_label(raw, synthia_lut(16), "SYNTHIA class ids (0..22)", "x.png")


def test_data_check_of_a_missing_cityscapes_root_says_it_once(tmp_path, capsys):
    """Issue 27.8: `asg data check cityscapes MISSING` printed the same error for each default split."""
    assert cli.main(["data", "check", "cityscapes", str(tmp_path / "nothere")]) == 1
    out = capsys.readouterr().out
    assert "FAILED (1 errors" in out and out.count("does not exist") == 1, out


# ``asg train`` (the CLI's main) on the tiny data, each step slowed down so that a signal lands mid-run
SLOW_TRAIN = textwrap.dedent(f"""
    import signal, sys, time
    # a background job of a shell without job control (`make test &`) starts with SIGINT ignored, and Python keeps
    # it so: Ctrl-C as in a terminal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {TESTS_DIR!r})
    import torch
    from helpers import TINY_OVERRIDES, tiny_data
    from asg import cli
    import asg.engine.trainer as trainer
    torch.set_num_threads(1)
    bundle = tiny_data()
    trainer.build_data = lambda cfg: bundle
    step = trainer.Trainer.train_step
    def slow_step(self, batch):
        time.sleep(0.3)
        return step(self, batch)
    trainer.Trainer.train_step = slow_step
    sets = [a for o in TINY_OVERRIDES + sys.argv[2:] for a in ("--set", o)]
    sys.exit(cli.main(["train", "--config", sys.argv[1] + "/recipe.yaml", "--out", sys.argv[1] + "/run", *sets]))
""")


def _signal_a_training(folder: Path, sig: int, wait_for: str, *overrides: str) -> subprocess.CompletedProcess:
    """Start ``asg train`` into ``folder/run``, send ``sig`` once ``wait_for`` exists in the run folder."""
    import time

    folder.mkdir(exist_ok=True)
    (folder / "recipe.yaml").write_text("name: tiny\n")
    env = {**os.environ, "PYTHONPATH": SRC_DIR}
    argv = [sys.executable, "-c", SLOW_TRAIN, str(folder), "train.steps=200", *overrides]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (folder / "run" / wait_for).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)  # a loaded machine: the signal lands, the exit may take a while
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.slow
def test_sigterm_to_asg_train_says_how_to_continue_like_ctrl_c(tmp_path):
    """Issue 27.8: SIGTERM (docker stop, SLURM, systemd) ended `asg train` with exit 143 and no word; now it is
    handled as Ctrl-C is: one line saying how to continue (exit 143), and the run resumes."""
    proc = _signal_a_training(tmp_path, signal.SIGTERM, "checkpoint.json", "train.checkpoint_every=2")
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "asg: stopped by SIGTERM; continue with the same command and --resume", proc.stderr
    assert (tmp_path / "run" / "checkpoint.json").exists()


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_says_rerun_without_resume(tmp_path):
    """Issue 27.8: Ctrl-C before the first checkpoint advised --resume, which then fails ("no checkpoint in this
    folder"); now it says to rerun the same command."""
    proc = _signal_a_training(tmp_path, signal.SIGINT, "config.yaml", "train.checkpoint_every=1000")
    assert proc.returncode == 130, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("asg: interrupted; no checkpoint was written yet") and "without --resume" in last, last
    assert not (tmp_path / "run" / "checkpoint.json").exists()


def test_source_val_ties_pick_the_later_step(tiny_bundle, tiny_config, tmp_path):
    """Issue 27.8: equal source-val scores (here every step: a learning rate too small to change a prediction)
    select the later step, not the earliest."""
    import json

    from asg.engine.trainer import Trainer

    cfg = tiny_config("optim.lr=1e-12", "method.name=erm")
    Trainer(cfg, tmp_path / "run", data=tiny_bundle, quiet=True).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["metrics"]["source_val"]["mean_class_acc"] for r in rows if "metrics" in r}
    assert len(scores) >= 2 and len(set(scores.values())) == 1, scores
    manifest = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert manifest["best"]["source-val"]["step"] == max(scores)


def test_train_refuses_init_from_an_unfinished_run_as_adapt_does(tiny_bundle, tiny_config, tmp_path):
    """Issue 27.8: `asg train --set model.init_from=UNFINISHED_RUN` was accepted silently (asg adapt refuses it):
    refused the same way, with the same way out (adapt.from_unfinished=true)."""
    import shutil

    from asg.engine.trainer import Trainer
    from asg.errors import WeightsError

    Trainer(tiny_config(), tmp_path / "done_run", data=tiny_bundle, quiet=True).fit()
    shutil.copytree(tmp_path / "done_run", tmp_path / "stopped")
    (tmp_path / "stopped" / "done").unlink()
    with pytest.raises(WeightsError, match=r"model.init_from: .*stopped never finished .*adapt.from_unfinished=true"):
        Trainer(tiny_config(f"model.init_from={tmp_path / 'stopped'}"), tmp_path / "b", data=tiny_bundle, quiet=True)
    Trainer(tiny_config(f"model.init_from={tmp_path / 'done_run'}"), tmp_path / "c", data=tiny_bundle, quiet=True)
    Trainer(
        tiny_config(f"model.init_from={tmp_path / 'stopped'}", "adapt.from_unfinished=true"),
        tmp_path / "d",
        data=tiny_bundle,
        quiet=True,
    )


def test_a_batch_larger_than_the_training_set_is_warned(tiny_bundle, tiny_config, tmp_path):
    """Issue 27.8: data.batch_size=256 on 48 training images ran with batches of 48 without a word."""
    from asg.data.bundle import DataWarning
    from asg.engine.trainer import Trainer

    with pytest.warns(DataWarning, match=r"data.batch_size=256 is larger than the training set \(48 images\)"):
        Trainer(tiny_config("data.batch_size=256"), None, data=tiny_bundle, quiet=True)


def test_a_full_disk_at_the_first_checkpoint_says_rerun_and_leaves_no_orphan(tmp_path, monkeypatch):
    """Issue 27.8: the trainer state of the first checkpoint fails to write (the disk fills after the weights):
    the message advised --resume, which is then refused, and the weight file stayed behind (21 MB on the full
    disk). Now it says to rerun without --resume and removes the step's files; at a later checkpoint the kept one
    is named and --resume is right."""
    import errno

    import torch

    from asg.engine.rundir.folder import RunDir
    from asg.engine.rundir.lock import RunFolderError

    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    rd = RunDir(tmp_path / "run")
    with rd:
        monkeypatch.setattr(torch, "save", full)
        with pytest.raises(RunFolderError) as info:
            rd.save_checkpoint(2, {"w": torch.zeros(1000)}, {"x": 1}, {}, None)
        assert "without --resume" in str(info.value) and "no checkpoint had been written yet" in str(info.value)
        assert not list((tmp_path / "run" / "checkpoints").glob("*")), "the step's weight file is an orphan"
        monkeypatch.setattr(torch, "save", real_save)
        rd.save_checkpoint(2, {"w": torch.zeros(1000)}, {"x": 1}, {}, None)
        monkeypatch.setattr(torch, "save", full)
        with pytest.raises(RunFolderError) as info:
            rd.save_checkpoint(4, {"w": torch.ones(1000)}, {"x": 2}, {}, None)
        assert "the checkpoint of step 2 is kept" in str(info.value) and "without --resume" not in str(info.value)
        assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*")) == [
            "step_0000002.safetensors",
            "step_0000002.state.pt",
        ]


def test_prediction_figures_name_each_colour_and_the_white_ignored_pixels(tmp_path):
    """predictions.png's legend: every class shown (label or prediction) by name and colour, and white = ignored."""
    from asg.engine.evaluation.report import legend_entries, plot_predictions

    palette = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    label = np.array([[0, 1], [255, 255]])
    pred = np.array([[0, 2], [0, 0]])
    samples = [(np.zeros((2, 2, 3)), label, pred)]
    entries = legend_entries(samples, palette, ["background", "one", "two"])
    assert entries == [
        ("background", (0, 0, 0)),
        ("one", (255, 0, 0)),
        ("two", (0, 255, 0)),
        ("ignored (255): not scored", (255, 255, 255)),
    ]
    assert legend_entries([(np.zeros((2, 2, 3)), label[:1], pred[:1])], palette, None) == [
        ("0", (0, 0, 0)),
        ("1", (255, 0, 0)),
        ("2", (0, 255, 0)),
    ]
    plot_predictions(samples, palette, tmp_path / "p.png", "t", ["background", "one", "two"])
    assert (tmp_path / "p.png").stat().st_size > 0
