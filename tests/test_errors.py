"""User errors: one clear line naming the key, file or folder and what to do; never a traceback."""

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import asg.api
import asg.cli
import asg.l2o.meta
from asg.cli import main
from asg.config import ModelConfig, config_to_dict, load_config
from asg.engine.rundir.weights import load_weights, save_weights
from asg.errors import AsgError, ConfigError, DataError, WeightsError
from asg.recipe_files import apply_overrides
from asg.utils import resolve_device

# ---------------------------------------------------------------------------------------------- config


def test_mapping_override_merges_into_the_section(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"optim": {"max_grad_norm": 3.0, "momentum": 0.5}}))
    cfg = load_config(recipe, ["optim={lr: 0.1}"])
    assert (cfg.optim.lr, cfg.optim.max_grad_norm, cfg.optim.momentum) == (0.1, 3.0, 0.5)
    # recursive, and a plain value still replaces
    data = apply_overrides({"a": {"b": {"c": 1, "d": 2}, "e": 3}}, ["a={b: {c: 5}}", "a.e=4"])
    assert data == {"a": {"b": {"c": 5, "d": 2}, "e": 4}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=0", "train.steps must be positive"),
        ("train.eval_every=0", "train.eval_every must be positive"),
        ("train.checkpoint_every=-1", "train.checkpoint_every must be positive"),
        ("train.log_every=0", "train.log_every must be positive"),
        ("data.batch_size=0", "data.batch_size must be positive"),
        ("data.image_size=0", "data.image_size must be positive"),
        ("data.eval_batch_size=0", "data.eval_batch_size must be positive"),
        ("model.hidden_dim=-1", "model.hidden_dim must be >= 0"),
        ("data.num_train=0", "data.num_train must be positive"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("data.eval_max_per_set=0", "data.eval_max_per_set must be positive"),
        ("data.source_val_fraction=1", "data.source_val_fraction must be in [0, 1)"),
        ("optim.lr=0", "optim.lr must be positive"),
        ("optim.lr=.nan", "optim.lr must be positive"),
        ("optim.momentum=1", "optim.momentum must be in [0, 1)"),
        ("optim.momentum=-0.1", "optim.momentum must be in [0, 1)"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0"),
        ("optim.backbone_lr_mult=-1", "optim.backbone_lr_mult must be >= 0"),
        ("optim.max_grad_norm=0", "optim.max_grad_norm must be positive"),
        ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
        ("optim.floor_at=0", "optim.floor_at must be in (0, 1]"),
        ("optim.floor_at=1.5", "optim.floor_at must be in (0, 1]"),
        ("method.kl_weight=-1", "method.kl_weight must be >= 0"),
        ("method.l2sp_alpha=-0.01", "method.l2sp_alpha must be >= 0"),
        ("method.kl_cap=0", "method.kl_cap must be positive"),
        ("train.loss_explosion_factor=1", "train.loss_explosion_factor must be > 1"),
        ("l2o.episodes=0", "l2o.episodes must be positive"),
        ("l2o.episode_steps=0", "l2o.episode_steps must be positive"),
        ("l2o.num_steps=0", "l2o.num_steps must be positive"),
        ("train.device=gpu0", "train.device: 'gpu0' is not a device"),
        ("optim.sgd=adam", "optim.sgd: 'adam' is not one of"),
        ("data.on_bad_image=ignore", "data.on_bad_image: 'ignore' is not one of"),
    ],
)
def test_invalid_values_give_one_line_naming_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_boundary_and_unset_values_are_accepted():
    cfg = load_config(
        None,
        [
            "optim.momentum=0",
            "optim.floor_at=1",
            "optim.warmup_steps=0",
            "optim.weight_decay=0",
            "data.num_workers=0",
            "method.kl_weight=0",
            "optim.max_grad_norm=null",
            "method.kl_cap=null",
            "data.eval_max_per_set=null",
            "train.loss_explosion_factor=null",
            "train.device=cuda:1",  # syntax only: the GPU is looked for when training starts
        ],
    )
    assert cfg.optim.floor_at == 1.0 and cfg.train.loss_explosion_factor is None


# ---------------------------------------------------------------------------------------------- device


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_gpu_says_what_to_use(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AsgError) as info:
        resolve_device(name)
    assert str(info.value) == (
        f"train.device={name} but no CUDA GPU is visible (torch.cuda.is_available() is False); "
        "use train.device=auto or cpu"
    )
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")


def test_device_name_and_index_are_checked(monkeypatch):
    with pytest.raises(ConfigError, match=r"train\.device: 'gpu0' is not a device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(AsgError, match=r"train\.device=cuda:3 but only 1 CUDA GPU"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


# ---------------------------------------------------------------------------------------------- weights


class _Net(nn.Module):
    def __init__(self, in_dim: int = 4, num_classes: int = 10, extra: bool = False):
        super().__init__()
        self.backbone = nn.Linear(in_dim, 8)
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes))
        if extra:
            self.extra = nn.Linear(2, 2)


def _one_line_weights_error(model: nn.Module, path: Path) -> str:
    with pytest.raises(WeightsError) as info:
        load_weights(model, path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_corrupt_or_truncated_checkpoint(tmp_path):
    good = tmp_path / "good.safetensors"
    save_weights(_Net(), good)
    data = good.read_bytes()
    half, noise = tmp_path / "half.safetensors", tmp_path / "noise.safetensors"
    half.write_bytes(data[: len(data) // 2])
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    for path in (half, noise):
        msg = _one_line_weights_error(_Net(), path)
        assert msg.startswith(f"cannot read checkpoint {path}: the file is corrupt or truncated (")
    load_weights(_Net(), good)  # the intact file still loads


def test_checkpoint_of_another_shape_names_keys_shapes_and_cause(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(_Net(num_classes=10), path)
    msg = _one_line_weights_error(_Net(num_classes=5), path)
    assert "head.2.weight is [10, 16] in the file but [5, 16] in the model" in msg
    assert "number of classes" in msg and "size mismatch" not in msg
    msg = _one_line_weights_error(_Net(in_dim=6), path)
    assert "backbone.weight is [8, 4] in the file but [8, 6] in the model" in msg and "another backbone" in msg
    msg = _one_line_weights_error(_Net(extra=True), path)  # the key message is kept
    assert "does not match the model: missing ['extra.weight', 'extra.bias']" in msg


def test_real_model_with_another_class_count(tmp_path):
    from asg.models import build_model

    path = tmp_path / "w.safetensors"
    save_weights(build_model(ModelConfig(weights="none", hidden_dim=8), 10), path)
    msg = _one_line_weights_error(build_model(ModelConfig(weights="none", hidden_dim=8), 5), path)
    assert "head.2.weight is [10, 8] in the file but [5, 8] in the model" in msg


# ---------------------------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 2-step run on a tiny image folder (3 classes), shared by the evaluate tests."""
    base = tmp_path_factory.mktemp("evalrun")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("real", 2)):
        for c in ("a", "b", "c"):
            folder = base / "images" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    recipe = {
        "data": {"name": "imagefolder", "root": str(base / "images"), "image_size": 32, "batch_size": 4},
        "model": {"weights": "none", "hidden_dim": 8},
        "method": {"name": "erm"},
        "train": {"steps": 2, "eval_every": 2, "checkpoint_every": 2, "progress": False, "device": "cpu"},
        "eval": {"retention": False, "full_eval_selected": False},
        "optim": {"warmup_steps": 0},
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = base / "run"
    assert main(["train", "--config", str(path), "--out", str(run)]) == 0
    return run


@pytest.mark.slow
def test_evaluate_into_an_unwritable_folder_prints_the_table_then_one_line(trained_run, tmp_path, capsys):
    capsys.readouterr()
    trained_run.chmod(0o555)
    try:
        if os.access(trained_run, os.W_OK):  # root ignores the mode: make the folder's creation fail instead
            (tmp_path / "a_file").write_text("")
            argv = ["--out", str(tmp_path / "a_file" / "evals")]
        else:
            argv = []
        code = main(["evaluate", str(trained_run), *argv])
    finally:
        trained_run.chmod(0o755)
    out, err = capsys.readouterr()
    assert code == 2
    assert "mean-class acc %" in out and "real" in out  # the table came first
    last = err.splitlines()[-1]  # (progress bars come before it on stderr)
    assert last.startswith("asg: error: cannot write the evaluation: the folder ") and "Traceback" not in err
    assert "is not writable" in last and last.endswith("pass --out DIR to write it elsewhere")

    evals = tmp_path / "evals" / "nested"
    assert main(["evaluate", str(trained_run), "--out", str(evals)]) == 0
    result = json.loads((evals / "eval_last.json").read_text())
    assert result["sets"]["real"]["n"] == 6 and (evals / "confusion_last_real.png").exists()
    assert not list(evals.glob(".*.tmp"))  # the JSON was written through a temporary file
    assert f"wrote {evals / 'eval_last.json'}" in capsys.readouterr().out


@pytest.mark.slow
def test_evaluate_names_a_missing_run_folder_or_checkpoint(trained_run, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a run folder" in capsys.readouterr().err
    assert main(["evaluate", str(trained_run), "--checkpoint", "best"]) == 2
    assert "checkpoint 'best': use last, source-val, oracle" in capsys.readouterr().err
    assert main(["evaluate", str(trained_run), "--checkpoint", str(tmp_path / "no.safetensors")]) == 2
    assert "no.safetensors does not exist (checkpoints in" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- OSError / workers


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/runs/x/last.safetensors"),
            "cannot write /runs/x/last.safetensors: No space left on device (the disk is full",
        ),
        (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), "Permission denied (permission denied: choose"),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), "cannot write /mnt/ro/x: Read-only file system"),
        (OSError(errno.EFBIG, "File too large", "/runs/big.pt"), "(the file exceeds the file size limit"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (the disk is full"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x.png"), "cannot read /x.png: No such file"),
    ],
)
def test_os_errors_are_one_line(monkeypatch, capsys, exc, expected):
    def fail(args):
        raise exc

    monkeypatch.setattr(asg.cli, "_train", fail)
    assert main(["train", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asg: error: ") and expected in err and err.count("\n") == 1


def test_os_error_without_file_or_known_errno_is_a_bug(monkeypatch):
    def fail(args):
        raise OSError("something internal")

    monkeypatch.setattr(asg.cli, "_train", fail)
    with pytest.raises(OSError, match="something internal"):
        main(["train", "--config", "x.yaml"])


def test_data_loader_worker_error_prints_the_original_line(monkeypatch, capsys):
    from torch.utils.data._utils import ExceptionWrapper

    message = "/data/real/cat/7.png: cannot decode the image; fix or remove it, or set data.on_bad_image=skip"

    def fail(args):
        try:
            raise DataError(message)
        except DataError:
            wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
        wrapper.reraise()  # as torch does in the main process: same class, worker traceback in the message

    monkeypatch.setattr(asg.cli, "_train", fail)
    assert main(["train", "--config", "x.yaml"]) == 2
    assert capsys.readouterr().err == f"asg: error: {message}\n"


# ---------------------------------------------------------------------------------------------- --resume / --config


@pytest.fixture
def fake_train(monkeypatch):
    calls = []

    def train(config, overrides=None, out=None, resume=False, quiet=False):
        calls.append(SimpleNamespace(config=config, overrides=overrides, out=out, resume=resume))
        return SimpleNamespace(out_dir=out, selections={})

    monkeypatch.setattr(asg.api, "train", train)
    return calls


def _named_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "myrun.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 3}}))
    return path


def test_train_resume_needs_no_config_with_out(fake_train, tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path)]) == 0
    assert fake_train[-1].config is None and fake_train[-1].out == tmp_path and fake_train[-1].resume
    assert "asg: note" not in capsys.readouterr().err
    for argv in (["train"], ["train", "--resume"], ["train", "--out", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == "asg: error: asg train needs --config RECIPE (or --resume --out RUN_FOLDER to continue a run)\n"
    assert len(fake_train) == 1


def test_train_resume_with_config_says_what_config_is_for(fake_train, tmp_path, capsys):
    recipe = _named_recipe(tmp_path)
    assert main(["train", "--config", str(recipe), "--resume", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().err == (
        f"asg: note: --resume continues {tmp_path / 'r'} with its saved config.yaml; --config {recipe} is ignored\n"
    )
    assert main(["train", "--config", str(recipe), "--resume"]) == 0
    assert capsys.readouterr().err == (
        f"asg: note: --resume continues {Path('runs/myrun')} with its saved config.yaml; --config {recipe} is only "
        "used to find the run folder (default runs/<name>)\n"
    )
    assert fake_train[-1].config == str(recipe) and fake_train[-1].out is None
    assert main(["train", "--config", str(recipe), "--out", str(tmp_path / "r")]) == 0
    assert "note" not in capsys.readouterr().err  # no note without --resume


def test_l2o_resume_uses_the_saved_config(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(asg.l2o.meta, "meta_train", lambda cfg, out, resume: calls.append((cfg, out, resume)))
    out = tmp_path / "meta"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(load_config(None, ["l2o.episodes=7"]))))
    assert main(["l2o", "train", "--resume", "--out", str(out), "--set", "l2o.gamma=0.5"]) == 0
    cfg, got_out, resume = calls[-1]
    assert (cfg.l2o.episodes, cfg.l2o.gamma, got_out, resume) == (7, 0.5, out, True)
    assert main(["l2o", "train", "--config", str(_named_recipe(tmp_path)), "--resume", "--out", str(out)]) == 0
    assert calls[-1][0].l2o.episodes == 7 and "is ignored" in capsys.readouterr().err
    assert main(["l2o", "train", "--resume", "--out", str(tmp_path)]) == 2
    assert f"cannot resume: {tmp_path / 'config.yaml'} does not exist" in capsys.readouterr().err
    assert main(["l2o", "train"]) == 2
    assert "asg l2o train needs --config RECIPE" in capsys.readouterr().err
