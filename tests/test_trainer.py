import pytest
import torch
from helpers import CrashAt
from safetensors.torch import load_file

from asg.engine.trainer import Trainer
from asg.errors import AsgError, TrainingDiverged


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_step_moves_backbone_and_head_but_not_teacher_or_imagenet_head(tiny_bundle, tiny_config):
    trainer = Trainer(tiny_config("train.steps=2"), None, data=tiny_bundle, quiet=True)
    teacher0, head0 = _snapshot(trainer.teacher), _snapshot(trainer.model.imagenet_head)
    backbone0, task0 = _snapshot(trainer.model.backbone), _snapshot(trainer.model.head)
    trainer.fit()
    for k, v in _snapshot(trainer.teacher).items():
        assert torch.equal(v, teacher0[k]), f"teacher changed: {k}"
    for k, v in _snapshot(trainer.model.imagenet_head).items():
        assert torch.equal(v, head0[k]), f"ImageNet head changed: {k}"
    moved_backbone = [
        k
        for k, v in _snapshot(trainer.model.backbone).items()
        if v.is_floating_point() and not torch.equal(v, backbone0[k]) and "imagenet" not in k
    ]
    assert moved_backbone, "no backbone weight moved"
    assert all(not torch.equal(v, task0[k]) for k, v in _snapshot(trainer.model.head).items())


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=5", "teacher.cache=true", "optim.sgd=lr_in_momentum")
    Trainer(cfg, tmp_path / "a", data=tiny_bundle, quiet=True).fit()

    with pytest.raises(KeyboardInterrupt):  # checkpoint written at step 2; step 3 is lost
        Trainer(cfg, tmp_path / "b", data=tiny_bundle, quiet=True, callbacks=[CrashAt(3)]).fit()
    with pytest.raises(AsgError, match="--resume"):
        Trainer(cfg, tmp_path / "b", data=tiny_bundle, quiet=True).fit()
    Trainer(cfg, tmp_path / "b", data=tiny_bundle, quiet=True, resume=True).fit()

    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs at {k}"
    rows_a = (tmp_path / "a" / "results.jsonl").read_text().splitlines()
    rows_b = (tmp_path / "b" / "results.jsonl").read_text().splitlines()
    assert [r.split('"elapsed_s"')[0] for r in rows_a] == [r.split('"elapsed_s"')[0] for r in rows_b]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("train.steps=6")
    trainer = Trainer(cfg, tmp_path, data=tiny_bundle, quiet=True)
    loss = trainer.method.loss

    def poisoned(out, labels, teacher_logits):
        lo = loss(out, labels, teacher_logits)
        if trainer.step == 3:
            lo.loss = lo.loss * float("nan")
        return lo

    monkeypatch.setattr(trainer.method, "loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 4") as err:  # the 4th step's forward
        trainer.fit()
    assert "step 2" in str(err.value) and "checkpoint.json" in str(err.value)
    saved = load_file(tmp_path / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    assert not (tmp_path / "done").exists()


@pytest.mark.slow
def test_run_folder_contents(tiny_bundle, tiny_config, tmp_path):
    result = Trainer(tiny_config(), tmp_path, data=tiny_bundle, quiet=True).fit()
    for name in (
        "config.yaml",
        "versions.json",
        "results.jsonl",
        "summary.json",
        "done",
        "last.safetensors",
        "best_source_val.safetensors",
        "best_oracle.safetensors",
        "checkpoint.json",
    ):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert [row["step"] for row in result.history] == [2, 4]
    assert result.selections["oracle"]["note"].startswith("oracle")
    assert result.selections["last"]["step"] == 4


def test_teacher_cache_is_refused_with_a_note_when_training_images_are_random(tiny_bundle, tiny_config, capsys):
    import dataclasses

    random_bundle = dataclasses.replace(tiny_bundle, has_augmentation=True)
    trainer = Trainer(tiny_config("teacher.cache=true"), None, data=random_bundle)
    assert not trainer.teacher_source.use_cache and "teacher.cache is off" in capsys.readouterr().err
    assert Trainer(tiny_config("teacher.cache=true"), None, data=tiny_bundle, quiet=True).teacher_source.use_cache


def test_teacher_runs_with_batchnorm_folded_and_gives_the_imagenet_logits(tiny_bundle, tiny_config):
    from asg.models import make_teacher

    trainer = Trainer(tiny_config(), None, data=tiny_bundle, quiet=True)
    plain = make_teacher(trainer.model)  # the student is still the ImageNet network before training
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trainer.teacher.modules())
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(trainer.teacher(x), plain(x), rtol=1e-4, atol=1e-4)
    unfused = Trainer(tiny_config("teacher.fuse_bn=false"), None, data=tiny_bundle, quiet=True)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unfused.teacher.modules())
