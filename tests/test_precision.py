"""train.precision (bf16 / fp16 autocast, fp16 loss scaling), train.compile, and what versions.json records."""

import json

import pytest
import torch
from helpers import CrashAt
from safetensors.torch import load_file

import asg.engine.step as step_module
from asg.config import load_config
from asg.engine.precision import MAX_OVERFLOW_STREAK
from asg.engine.trainer import Trainer
from asg.errors import TrainingDiverged


def _overflow_at(trainer, steps):
    """Make the task head's weight gradient infinite (a finite loss) during the given 0-based steps."""
    weight = trainer.model.head[0].weight
    weight.register_hook(lambda g: g * float("inf") if trainer.step in steps else g)
    return weight


@pytest.mark.slow
def test_bf16_runs_student_and_teacher_in_bf16_without_autograd_on_the_teacher(tiny_bundle, tiny_config):
    trainer = Trainer(tiny_config("train.precision=bf16", "train.steps=2"), None, data=tiny_bundle, quiet=True)
    seen = []
    forward_loss = trainer.method.forward_loss

    def record(model, batch):
        out = model(batch.x)
        seen.append((out.logits.dtype, batch.teacher_logits.dtype, batch.teacher_logits.requires_grad))
        return forward_loss(model, batch)

    trainer.method.forward_loss = record
    trainer.fit()
    assert seen and all(s == (torch.bfloat16, torch.bfloat16, False) for s in seen)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32


@pytest.mark.slow
def test_fp16_skips_an_overflowing_step_halves_the_scale_and_goes_on(tiny_bundle, tiny_config):
    cfg = tiny_config("train.precision=fp16", "train.steps=3", "method.kl_weight=0")
    trainer = Trainer(cfg, None, data=tiny_bundle, quiet=True)
    weight = _overflow_at(trainer, {1})
    before = {}
    step = trainer.train_step

    def spy(batch):
        before[trainer.step] = weight.detach().clone()
        return step(batch)

    trainer.train_step = spy
    trainer.fit()
    scale = trainer.precision.scaler.get_scale()
    assert scale == pytest.approx(2.0**16 / 2)  # the default initial scale, halved once
    assert torch.equal(before[1], before[2])  # the overflowing step changed nothing
    assert not torch.equal(before[0], before[1]) and not torch.equal(before[2], weight)


def test_fp32_stops_at_a_non_finite_gradient(tiny_bundle, tiny_config):
    trainer = Trainer(tiny_config("train.steps=3"), None, data=tiny_bundle, quiet=True)
    _overflow_at(trainer, {1})
    with pytest.raises(TrainingDiverged, match="non-finite gradient norm at step 2"):
        trainer.fit()


@pytest.mark.slow
def test_fp16_stops_when_every_step_overflows(tiny_bundle, tiny_config, monkeypatch):
    # the rule at a streak of 3 rather than MAX_OVERFLOW_STREAK (25): 25 fp16 steps on the CPU cost 10 s
    assert MAX_OVERFLOW_STREAK > 3
    monkeypatch.setattr(step_module, "MAX_OVERFLOW_STREAK", 3)
    cfg = tiny_config("train.precision=fp16", "train.steps=5", "train.eval_every=1000")
    trainer = Trainer(cfg, None, data=tiny_bundle, quiet=True)
    _overflow_at(trainer, set(range(1000)))
    with pytest.raises(TrainingDiverged, match="overflowed at 3 steps in a row"):
        trainer.fit()
    assert trainer.step == 3 - 1


@pytest.mark.slow
def test_fp16_resume_restores_the_loss_scale_and_equals_the_uninterrupted_run(
    tiny_bundle, tiny_config, tmp_path, monkeypatch
):
    cfg = tiny_config("train.precision=fp16", "train.steps=5")
    a = Trainer(cfg, tmp_path / "a", data=tiny_bundle, quiet=True)
    _overflow_at(a, {0})
    a.fit()

    b = Trainer(cfg, tmp_path / "b", data=tiny_bundle, quiet=True, callbacks=[CrashAt(3)])  # after step 2's checkpoint
    _overflow_at(b, {0})
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    resumed = Trainer(cfg, tmp_path / "b", data=tiny_bundle, quiet=True, resume=True)
    resumed.fit()
    # halved at step 1 and restored from the checkpoint (a fresh scaler would still be at 2^16)
    assert resumed.precision.scaler.get_scale() == a.precision.scaler.get_scale() == pytest.approx(2.0**15)
    wa, wb = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_versions_json_records_how_the_run_computed(tiny_bundle, tiny_config, tmp_path):
    Trainer(tiny_config("train.precision=fp16", "train.steps=1"), tmp_path, data=tiny_bundle, quiet=True).fit()
    v = json.loads((tmp_path / "versions.json").read_text())
    assert (v["precision"], v["autocast_dtype"], v["grad_scaler"]) == ("fp16", "float16", True)
    assert v["channels_last"] is True and v["compile"] is None and v["world_size"] == 1


def test_train_amp_of_older_recipes_reads_as_bf16():
    assert load_config(None, ["train.amp=true"]).train.precision == "bf16"
    assert load_config(None, ["train.amp=false"]).train.precision == "fp32"
    with pytest.raises(Exception, match="train.precision"):
        load_config(None, ["train.precision=fp8"])


@pytest.mark.slow
def test_compile_in_place_keeps_groups_and_checkpoint_keys(tiny_bundle, tiny_config, tmp_path):
    plain = Trainer(tiny_config("train.steps=2"), tmp_path / "plain", data=tiny_bundle, quiet=True)
    plain.fit()
    cfg = tiny_config("train.steps=2", "train.compile=true", "train.compile_backend=eager")
    compiled = Trainer(cfg, tmp_path / "compiled", data=tiny_bundle, quiet=True)
    names = [name for name, _ in compiled.groups]
    compiled.fit()
    assert names == [name for name, _ in plain.groups]
    a, b = load_file(tmp_path / "plain" / "last.safetensors"), load_file(tmp_path / "compiled" / "last.safetensors")
    assert a.keys() == b.keys()  # no "_orig_mod." prefix: checkpoints load into an uncompiled model
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    assert json.loads((tmp_path / "compiled" / "versions.json").read_text())["compile"] == "eager"
