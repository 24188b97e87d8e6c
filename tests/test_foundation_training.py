"""Two training steps of the loop for each new backbone family, both tasks: tiny random timm models at 56 px.

ASG's KL is zero at the first step (the student starts as the teacher, whatever the guidance head), the steps
are finite, and the new head moves."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_VIT, CrashAt, RandomImages, Scenes, dinov2_files, tiny_clip

from asg.config import ModelConfig
from asg.data import DataBundle
from asg.engine.callbacks import Callback
from asg.engine.trainer import Trainer
from asg.errors import ConfigError
from asg.models import build_model

TINY_CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (16, 32, 48, 64)}


class Logs(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_step_end(self, trainer, out) -> None:
        self.rows.append(out.logs)


def _convnext_file(tmp_path) -> str:
    import timm

    torch.manual_seed(0)
    path = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_tiny", pretrained=False, **TINY_CONVNEXT).state_dict(), path)
    return str(path)


def _model_config(family: str, tmp_path) -> ModelConfig:
    if family == "convnext":
        return ModelConfig(
            backbone="convnext_tiny", weights=_convnext_file(tmp_path), timm_kwargs=TINY_CONVNEXT, channels_last=False
        )
    if family == "clip":
        _, path, cfg_path = tiny_clip(tmp_path)
        return ModelConfig(
            backbone="clip_vitb16",
            weights=path,
            clip_model=cfg_path,
            clip_templates="simple",
            clip_cache_dir=str(tmp_path / "zs"),
            input_size=64,
            timm_kwargs=TINY_VIT,
            guidance_head="clip_zeroshot",
            channels_last=False,
        )
    backbone_file, head_file = dinov2_files(tmp_path)
    lora = {"lora_rank": 2} if family == "dinov2+lora" else {}
    return ModelConfig(
        backbone="dinov2_vits14",
        weights=backbone_file,
        guidance_file=head_file,
        timm_kwargs=TINY_VIT,
        channels_last=False,
        **lora,
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dinov2", "dinov2+lora", "clip", "convnext"])
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_two_asg_steps_on_each_backbone_family(family, task, tiny_config, tmp_path, one_thread):
    if family == "clip":
        pytest.importorskip("open_clip")
    if family == "dinov2+lora":
        pytest.importorskip("peft")
    mcfg = _model_config(family, tmp_path)
    if task == "segmentation":
        mcfg.segmenter = "fpn"
        data = DataBundle(
            Scenes(8, size=56),
            {"synthetic": Scenes(4, size=56, seed=1)},
            "synthetic",
            ["bg", "red"],
            task="segmentation",
        )
    else:
        data = DataBundle(
            RandomImages(16, size=56), {"synthetic": RandomImages(6, size=56, seed=1)}, "synthetic", ["a", "b", "c"]
        )
    cfg = tiny_config(
        "train.steps=2", "train.eval_every=2", "data.batch_size=4", "optim.lr=0.01", "model.channels_last=false"
    )
    torch.manual_seed(0)
    model = build_model(mcfg, data.num_classes, task=task)
    head0 = [p.detach().clone() for p in model.task_parameters()]
    logs = Logs()
    result = Trainer(cfg, None, data=data, model=model, quiet=True, check_files=False, callbacks=[logs]).fit()
    assert len(logs.rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs.rows)
    assert logs.rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # student == teacher before the first update
    assert any(not torch.equal(a, b) for a, b in zip(head0, model.task_parameters()))
    assert result.history and "synthetic" in result.history[-1]["metrics"]


def test_asg_refuses_a_backbone_without_guidance_head(tiny_config, tmp_path):
    backbone_file, _ = dinov2_files(tmp_path)
    mcfg = ModelConfig(backbone="dinov2_vits14", weights=backbone_file, guidance_head="none", timm_kwargs=TINY_VIT)
    data = DataBundle(
        RandomImages(8, size=56), {"synthetic": RandomImages(4, size=56, seed=1)}, "synthetic", ["a", "b", "c"]
    )
    with pytest.raises(ConfigError, match="guidance_head=none .*method.name=feature"):
        Trainer(tiny_config(), None, data=data, model=build_model(mcfg, 3), quiet=True, check_files=False)


@pytest.mark.slow
def test_lora_checkpoints_hold_what_trains_and_resume_exactly(tiny_config, tmp_path, one_thread):
    """A LoRA run saves adapters and head only (the recipe rebuilds the rest from its files); a crash and a
    resume give the uninterrupted run's weights, and asg's evaluation loads the partial file."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from asg.engine.rundir.weights import load_weights

    backbone_file, head_file = dinov2_files(tmp_path)
    model = [
        "model.backbone=dinov2_vits14",
        f"model.weights={backbone_file}",
        f"model.guidance_file={head_file}",
        "model.timm_kwargs={depth: 4, embed_dim: 64, num_heads: 2}",
        "model.lora_rank=2",
        "model.channels_last=false",
    ]
    cfg = tiny_config(*model, "train.steps=4", "data.batch_size=4")
    data = DataBundle(
        RandomImages(16, size=56), {"synthetic": RandomImages(6, size=56, seed=1)}, "synthetic", ["a", "b", "c"]
    )
    Trainer(cfg, tmp_path / "a", data=data, quiet=True, check_files=False).fit()
    saved = load_file(tmp_path / "a" / "last.safetensors")
    built = build_model(cfg.model, 3)
    assert set(saved) == set(built.trainable_state_dict()) and len(saved) < len(built.state_dict()) / 2
    assert any("lora" in k for k in saved) and all(k.startswith(("head.", "backbone.")) for k in saved)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "b", data=data, quiet=True, check_files=False, callbacks=[CrashAt(3)]).fit()
    Trainer(cfg, tmp_path / "b", data=data, quiet=True, check_files=False, resume=True).fit()
    resumed = load_file(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)
    fresh = build_model(cfg.model, 3)  # as asg evaluate does: the recipe's files, then the run's weights
    load_weights(fresh, tmp_path / "a" / "last.safetensors")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in built.state_dict().items() if k not in saved)
