"""Foundation backbones (DINOv2, CLIP, ConvNeXt via timm), guidance heads, LoRA: tiny random models at 56 px,
weight files written by the test in the original release layouts (CPU, no downloads)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_VIT, dinov2_files, tiny_clip

from asg.config import ModelConfig
from asg.errors import ConfigError, WeightsError
from asg.methods.base import kl_teacher_student
from asg.models import build_model, make_teacher
from asg.models.base import NoGuidanceHead

SIZE = 56


def _x(n: int = 2, h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(3))


def _guidance_is_exact(model) -> None:
    """Student guidance logits == teacher's before any step; the KL there is 0."""
    teacher = make_teacher(model.eval())
    x = _x()
    with torch.no_grad():
        out = model(x)
        t = teacher(x)
    assert out.imagenet_logits.shape == t.shape == (2, 1000)
    torch.testing.assert_close(out.imagenet_logits, t)
    assert float(kl_teacher_student(t, out.imagenet_logits)) == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for p in model.imagenet_head.parameters())


def test_dinov2_original_layout_loads_and_interpolates_position_embeddings(tmp_path):
    backbone_file, _ = dinov2_files(tmp_path, grid=6)
    cfg = ModelConfig(
        backbone="dinov2_vits14",
        weights=backbone_file,
        guidance_head="none",
        timm_kwargs=TINY_VIT,
        input_size=SIZE,
        channels_last=False,
    )
    model = build_model(cfg, 3).eval()
    bb = model.backbone
    assert bb.model.pos_embed.shape == (1, 1 + (SIZE // 14) ** 2, 64)  # 6x6 grid of the file -> 4x4
    assert bb.feature_dim == 128  # class token + mean patch token
    ref = torch.load(backbone_file, weights_only=True)
    assert torch.equal(bb.model.blocks[3].mlp.fc2.weight, ref["blocks.3.mlp.fc2.weight"])
    with torch.no_grad():
        out = model(_x(2, 70, 84))  # another size: position embeddings interpolated at run time
    assert out.logits.shape == (2, 3) and out.imagenet_logits.shape == (2, 0)


def test_dinov2_linear_head_guidance(tmp_path):
    backbone_file, head_file = dinov2_files(tmp_path)
    cfg = ModelConfig(
        backbone="dinov2_vits14",
        weights=backbone_file,
        guidance_file=head_file,
        timm_kwargs=TINY_VIT,
        channels_last=False,
    )
    model = build_model(cfg, 3)
    _guidance_is_exact(model)
    bb, x = model.backbone, _x()
    with torch.no_grad():  # the released head's input: normed class token ++ mean normed patch token
        tokens = bb.model.forward_features(bb.normalize(x))
        expected = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1) @ bb.imagenet_head.weight.T
        torch.testing.assert_close(model(x).imagenet_logits, expected + bb.imagenet_head.bias)
    torch.save({"weight": torch.zeros(1000, 64), "bias": torch.zeros(1000)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="not a DINOv2 linear head"):
        build_model(
            ModelConfig(
                backbone="dinov2_vits14",
                weights=backbone_file,
                guidance_head="dinov2_linear",
                guidance_file=str(tmp_path / "wrong.pth"),
                timm_kwargs=TINY_VIT,
            ),
            3,
        )


def test_foundation_backbone_without_file_names_it():
    with pytest.raises(WeightsError, match="dinov2_vitb14_pretrain.pth") as err:
        build_model(ModelConfig(backbone="dinov2_vitb14"), 3)
    assert "dl.fbaipublicfiles.com" in str(err.value) and "model.weights" in str(err.value)
    with pytest.raises(ConfigError, match="no ImageNet head"):
        build_model(
            ModelConfig(backbone="dinov2_vits14", weights="none", guidance_head="imagenet", timm_kwargs=TINY_VIT), 3
        )


@pytest.mark.slow
def test_clip_zero_shot_head_matches_open_clip_and_is_cached(tmp_path):
    ref, weights, clip_cfg = tiny_clip(tmp_path)
    cfg = ModelConfig(
        backbone="clip_vitb16",
        weights=weights,
        guidance_head="clip_zeroshot",
        clip_model=clip_cfg,
        clip_templates="simple",
        clip_cache_dir=str(tmp_path / "cache"),
        input_size=64,
        timm_kwargs=TINY_VIT,
        channels_last=False,
    )
    model = build_model(cfg, 3)
    _guidance_is_exact(model)
    head = model.imagenet_head
    assert head.classifier.shape == (32, 1000) and float(head.logit_scale) == pytest.approx(1 / 0.07, rel=1e-4)
    x = _x(2, 64, 64)
    with torch.no_grad():  # the timm image tower computes open_clip's image embedding
        emb = ref.encode_image(model.backbone.normalize(x), normalize=True)
        torch.testing.assert_close(
            model.eval()(x).imagenet_logits, head.logit_scale * emb @ head.classifier, atol=1e-4, rtol=1e-4
        )
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = build_model(cfg, 3)  # from the cache: same head
    assert torch.equal(again.imagenet_head.classifier, head.classifier)


def test_feature_guidance_without_head(tmp_path):
    backbone_file, _ = dinov2_files(tmp_path)
    cfg = ModelConfig(backbone="dinov2_vits14", weights=backbone_file, guidance_head="none", timm_kwargs=TINY_VIT)
    model = build_model(cfg, 3).eval()
    assert isinstance(model.imagenet_head, NoGuidanceHead)
    teacher = make_teacher(model).with_output("features")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x).features)


def test_convnext_from_timm_layout_file(tmp_path):
    import timm

    tiny = {"depths": (1, 1, 1, 1), "dims": (16, 32, 48, 64)}
    torch.manual_seed(0)
    net = timm.create_model("convnext_tiny", pretrained=False, **tiny).eval()
    path = tmp_path / "convnext.pth"
    torch.save(net.state_dict(), path)
    from asg.models import build_backbone

    bb = build_backbone("convnext_tiny", str(path), timm_kwargs=tiny).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(bb.imagenet_head(bb(x)), net(bb.normalize(x)))
    assert [n for n, _ in bb.layer_groups()] == ["stem", "stage1", "stage2", "stage3", "stage4", "norm"]
    assert bb.stage_strides == (4, 8, 16, 32)


def test_lora_groups_and_exact_start(tmp_path):
    backbone_file, head_file = dinov2_files(tmp_path)
    cfg = ModelConfig(
        backbone="dinov2_vits14",
        weights=backbone_file,
        guidance_file=head_file,
        timm_kwargs=TINY_VIT,
        lora_rank=4,
        lora_blocks=[2, 3],
        channels_last=False,
    )
    model = build_model(cfg, 3)
    _guidance_is_exact(model)  # lora_B starts at 0: the adapted network is the pretrained one
    groups = dict(model.layer_groups())
    lora = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert len(lora) == 2 * 4 * 2  # A and B, 4 targets, 2 blocks
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for ps in groups.values() for p in ps}
    assert groups["blocks1"] == [] and groups["blocks2"] == [] and len(groups["blocks3"]) == 8
    assert all(not p.requires_grad for n, p in model.backbone.named_parameters() if "lora_" not in n)
    state = model.trainable_state_dict()
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for ps in groups.values() for p in ps], lr=0.1)
    model.train()(_x()).logits.sum().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or n.startswith("head.") for n in changed)


def test_vit_segmenter_on_four_blocks(tmp_path):
    backbone_file, head_file = dinov2_files(tmp_path)
    cfg = ModelConfig(
        backbone="dinov2_vits14",
        weights=backbone_file,
        guidance_file=head_file,
        timm_kwargs=TINY_VIT,
        segmenter="fpn",
        channels_last=False,
    )
    model = build_model(cfg, 5, task="segmentation")
    assert model.backbone.stage_blocks == (0, 1, 2, 3)
    _guidance_is_exact(model)
    out = model(_x(2, 56, 70))
    assert out.logits.shape == (2, 5, 56, 70)
    names = [n for n, _ in model.layer_groups()]
    assert names == ["embed", "blocks1", "blocks2", "blocks3", "blocks4", "norm", "head"]
    head_ids = {id(p) for p in model.task_parameters()}
    assert {id(p) for p in model.head.parameters()} == head_ids


def test_frozen_backbone_trains_only_the_head(tmp_path):
    cfg = ModelConfig(
        backbone="dinov2_vits14", weights="none", guidance_head="none", timm_kwargs=TINY_VIT, freeze_backbone=True
    )
    model = build_model(cfg, 3)
    assert model.pretrained_parameters() == []
    assert set(model.trainable_state_dict()) == {n for n, _ in model.head.named_parameters(prefix="head")}


def test_official_asg_visda_checkpoint_loads(tmp_path, capsys):
    """A file in the official release's VisDA layout ({'epoch','state_dict','best_prec1'}, DataParallel keys,
    ImageNet ``fc`` kept, task head ``fc_new``), written here from a torchvision ResNet-50 with random weights."""
    import torchvision

    from asg.config import Config
    from asg.engine.rundir.init_from import load_init_weights

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    fc_new = torch.nn.Sequential(torch.nn.Linear(2048, 512), torch.nn.ReLU(), torch.nn.Linear(512, 12))
    state = {**net.state_dict(), **{f"fc_new.{k}": v for k, v in fc_new.state_dict().items()}}
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 30, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 61.1}, path)
    cfg = Config()
    cfg.model = ModelConfig(backbone="resnet50", weights="none", init_from=str(path), channels_last=False)
    model = build_model(cfg.model, 12).eval()
    assert load_init_weights(model, cfg, 12) == str(path)
    assert "epoch 30" in capsys.readouterr().out
    x = _x()
    with torch.no_grad():
        out = model(x)
        feats = torch.nn.Sequential(*list(net.eval().children())[:-1])(model.backbone.normalize(x)).flatten(1)
    torch.testing.assert_close(out.logits, fc_new(feats))
    torch.testing.assert_close(out.imagenet_logits, net.fc(feats))
    with pytest.raises(WeightsError, match="does not fit"):
        load_init_weights(build_model(cfg.model, 7), cfg, 7)
