"""Meta-training: files, synthetic data only, the policy learns something, resume per episode."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

import asg.engine.trainer as trainer_mod
from asg.engine.rundir.folder import RunDir
from asg.errors import AsgError, ConfigError
from asg.l2o import load_policy
from asg.l2o.meta import meta_train
from asg.l2o.plots import plot_meta_rewards, plot_scale_schedule
from asg.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Untouchable(Dataset):
    """A real test set that must never be read during meta-training."""

    labels = [0, 1, 2]

    def __len__(self):
        return 3

    def __getitem__(self, i):
        raise AssertionError("meta-training read a real test set")


@pytest.fixture
def meta_setup(tiny_bundle, tiny_config):
    tiny_bundle.eval_sets["real"] = Untouchable()
    cfg = tiny_config(
        "l2o.episodes=2",
        "l2o.episode_steps=8",
        "l2o.min_steps=2",
        "l2o.num_steps=2",
        "l2o.window_rule=intended",
        "l2o.lr_meta=0.05",
        "l2o.baseline=true",
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, tiny_bundle.num_classes)
    return cfg, tiny_bundle, model


@pytest.mark.slow
def test_meta_train_writes_policy_history_and_learns(meta_setup, tmp_path):
    cfg, bundle, model = meta_setup
    path = meta_train(cfg, tmp_path, data=bundle, model=model, quiet=True)
    assert path == tmp_path / "policy.safetensors"
    policy = load_policy(path, 7)
    rows = [json.loads(line) for line in (tmp_path / "meta_history.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows] == [1, 2]
    for r in rows:
        assert r["diverged"] is None
        assert r["decisions"] >= 2 and len(r["rewards"]) == r["decisions"]
        assert all(v < 0 for v in r["rewards"])  # -(task loss + lambda KL)
        assert r["policy_updates"] >= 1
        assert list(r["mean_scale"]) == [name for name, _ in model.layer_groups()]
    init = load_policy(tmp_path / "policies" / "episode_001.safetensors", 7)
    assert (tmp_path / "policies" / "episode_002.safetensors").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), init.state_dict().values()))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    for name in ("meta_rewards.png", "scale_schedule.png", "done", "config.yaml", "meta_state.pt"):
        assert (tmp_path / name).is_file(), name
    with pytest.raises(AsgError, match="--resume"):
        meta_train(cfg, tmp_path, data=bundle, model=model, quiet=True)


@pytest.mark.slow
def test_meta_train_clears_an_unfinished_start_and_marks_done_through_the_run_folder(
    meta_setup, tmp_path, monkeypatch, capsys
):
    cfg, bundle, model = meta_setup
    cfg.l2o.episodes = 1
    (tmp_path / "tb").mkdir()  # an earlier meta run killed during its first episode
    (tmp_path / "meta_history.jsonl").write_text('{"episode": 1, "cut')
    (tmp_path / "skipped_images.txt").write_text("gone.png\n")
    finished = []
    original = RunDir.finish
    monkeypatch.setattr(RunDir, "finish", lambda self: (finished.append(self.path), original(self))[1])
    meta_train(cfg, tmp_path, data=bundle, model=model)
    err = capsys.readouterr().err
    assert "held an earlier meta-training run that stopped before its first episode finished" in err
    assert "removed its meta_history.jsonl, skipped_images.txt, tb/" in err
    assert finished == [tmp_path] and (tmp_path / "done").is_file()  # done: written once, atomically, last
    assert not (tmp_path / "skipped_images.txt").exists()
    rows = [json.loads(line) for line in (tmp_path / "meta_history.jsonl").read_text().splitlines()]
    assert [r["episode"] for r in rows] == [1]
    for resume in (False, True):
        with pytest.raises(AsgError, match=r"already finished .*--resume"):
            meta_train(cfg, tmp_path, resume=resume, data=bundle, model=model, quiet=True)


@pytest.mark.slow
def test_resume_after_crash_equals_uninterrupted(meta_setup, tmp_path, monkeypatch):
    cfg, bundle, model = meta_setup
    meta_train(cfg, tmp_path / "a", data=bundle, model=model, quiet=True)

    original = trainer_mod.Trainer.fit
    calls = []

    def crash_in_second_episode(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(trainer_mod.Trainer, "fit", crash_in_second_episode)
    with pytest.raises(KeyboardInterrupt):
        meta_train(cfg, tmp_path / "b", data=bundle, model=model, quiet=True)
    monkeypatch.setattr(trainer_mod.Trainer, "fit", original)
    assert torch.load(tmp_path / "b" / "meta_state.pt", weights_only=True)["episode"] == 1
    meta_train(cfg, tmp_path / "b", resume=True, data=bundle, model=model, quiet=True)

    a = load_policy(tmp_path / "a" / "policy.safetensors", 7).state_dict()
    b = load_policy(tmp_path / "b" / "policy.safetensors", 7).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = (tmp_path / "b" / "meta_history.jsonl").read_text().splitlines()
    assert [json.loads(r)["episode"] for r in rows] == [1, 2]
    with pytest.raises(AsgError, match="already finished"):
        meta_train(cfg, tmp_path / "b", resume=True, data=bundle, model=model, quiet=True)


def test_heldout_reward_needs_source_val(meta_setup, tmp_path):
    cfg, bundle, model = meta_setup
    cfg.l2o.reward = "neg_heldout_loss"
    bundle.source_val_name = None
    with pytest.raises(AsgError, match="source-val"):
        meta_train(cfg, tmp_path, data=bundle, model=model, quiet=True)


def test_plots(tmp_path):
    history = [{"step": 0, "scales": [1.0, 1.0]}, {"step": 10, "scales": [0.3, 0.0]}, {"step": 30, "scales": [0.5, 1]}]
    assert plot_scale_schedule(history, ["a", "b"], tmp_path / "s.png").stat().st_size > 1000
    rows = [{"episode": 1, "mean_reward": -2.0, "mean_entropy": 2.39}, {"episode": 2, "mean_reward": -1.5}]
    assert plot_meta_rewards(rows, tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.slow
def test_heldout_reward_end_to_end(meta_setup, tmp_path):
    cfg, bundle, model = meta_setup
    cfg.l2o.reward, cfg.l2o.episodes = "neg_heldout_loss", 1
    meta_train(cfg, tmp_path, data=bundle, model=model, quiet=True)
    (row,) = [json.loads(line) for line in (tmp_path / "meta_history.jsonl").read_text().splitlines()]
    assert row["rewards"] and all(r < 0 for r in row["rewards"])
    assert len(set(row["rewards"])) > 1  # the source-val loss moves as the model trains
    assert (
        0.0 <= row["source_val_score"] <= 1.0 and row["source_val_metric"] == "mean_class_acc"
    )  # only the synthetic split was evaluated


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["l2o", "random"])
def test_trainer_applies_controller_scales(kind, tiny_bundle, tiny_config, tmp_path):
    from asg.engine.trainer import Trainer
    from asg.l2o import LRPolicy, build_controller, save_policy

    save_policy(LRPolicy(7), tmp_path / "p.safetensors")
    cfg = tiny_config(
        "train.steps=6", f"l2o.controller={kind}", f"l2o.policy={tmp_path / 'p.safetensors'}", "l2o.min_steps=2"
    )
    with pytest.raises(ConfigError, match="controller_factory"):  # the engine alone knows only "fixed"
        Trainer(cfg, None, data=tiny_bundle, quiet=True)
    trainer = Trainer(cfg, None, data=tiny_bundle, quiet=True, controller_factory=build_controller)
    result = trainer.fit()
    steps = [h["step"] for h in result.controller_history]
    assert steps == [0, 2, 4]  # intended rule: windows of max(2, t // 20) steps
    assert trainer.scales == result.controller_history[-1]["scales"]
    for group, scale in zip(trainer.optimizer.param_groups, trainer.scales):
        assert group["lr"] == pytest.approx(group["base_lr"] * trainer.stepper.schedule(5) * scale)
