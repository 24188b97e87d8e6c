"""Segmentation networks (FCN-8s/VGG16, DeepLabv3/ResNet, LR-ASPP/EfficientNet-Lite), multi-scale backbone maps,
VGG16 weights and the segmentation teacher (CPU, random weights, no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from asg.config import ModelConfig
from asg.errors import ConfigError, WeightsError
from asg.models import (
    ASGClassifier,
    ASGSegmenter,
    ModelOutput,
    build_backbone,
    build_model,
    make_teacher,
)
from asg.models.segmenter import FCN8sHead, bilinear_kernel
from asg.models.vgg import CACHE_FILE, cached_weights_path, vgg16

COMBOS = [
    ("lraspp", "efficientnet_lite0"),
    ("deeplabv3", "resnet50"),
    ("fcn8s", "vgg16"),
    ("fpn", "efficientnet_lite0"),
]
GROUPS = {
    "lraspp": ["conv_stem", "bn0", "stage1", "stage2", "stage3", "stage4", "head"],
    "deeplabv3": ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "head"],
    "fcn8s": ["conv1", "conv2", "conv3", "conv4", "conv5", "fc", "head"],
    "fpn": ["conv_stem", "bn0", "stage1", "stage2", "stage3", "stage4", "head"],
}
FEATURE_DIM = {"lraspp": 1280, "deeplabv3": 2048, "fcn8s": 512 * 7 * 7, "fpn": 1280}


def _cfg(segmenter: str, backbone: str, **kw) -> ModelConfig:
    return ModelConfig(backbone=backbone, weights="none", segmenter=segmenter, **kw)


@pytest.fixture(scope="module")
def segmenters() -> dict[str, ASGSegmenter]:
    """One model per segmenter in eval mode (ASG trains in eval mode); tests that train deep-copy them."""
    torch.manual_seed(0)
    return {seg: build_model(_cfg(seg, bb), 5, task="segmentation").eval() for seg, bb in COMBOS}


@pytest.mark.parametrize(("name", "output_stride"), [("efficientnet_lite0", 32), ("resnet50", 32), ("resnet50", 8)])
def test_forward_stages_contract(name, output_stride):
    bb = build_backbone(name, "none", output_stride=output_stride).eval()
    x = bb.normalize(torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        stages = bb.forward_stages(x)
        deepest = bb.forward_features(x)
    assert bb.stage_strides == tuple(min(s, output_stride) for s in (2, 4, 8, 16, 32))
    assert [t.shape[1] for t in stages] == list(bb.stage_channels)
    assert [t.shape[-1] for t in stages] == [64 // s for s in bb.stage_strides]
    assert torch.equal(stages[-1], deepest)


@pytest.mark.slow
def test_vgg_stages_plain_and_fcn_padding():
    x = torch.rand(1, 3, 64, 45)
    for fcn, sizes in ((False, [(32, 22), (16, 11), (8, 5), (4, 2), (2, 1)]), (True, None)):
        bb = vgg16("none", fcn=fcn).eval()
        with torch.no_grad():
            stages = bb.forward_stages(bb.normalize(x))
            assert torch.equal(stages[-1], bb.forward_features(bb.normalize(x)))
        assert [t.shape[1] for t in stages] == [64, 128, 256, 512, 512] == list(bb.stage_channels)
        if sizes is None:  # padding 100, pools rounding up: ceil((H + 198) / 2**i)
            sizes = [(-(-(64 + 198) // 2**i), -(-(45 + 198) // 2**i)) for i in range(1, 6)]
        assert [tuple(t.shape[-2:]) for t in stages] == sizes
        assert bb.features[0].padding == ((100, 100) if fcn else (1, 1))


@pytest.mark.slow
@pytest.mark.parametrize(("segmenter", "backbone"), COMBOS)
@pytest.mark.parametrize("size", [(64, 64), (67, 45)])
def test_output_shapes(segmenters, segmenter, backbone, size):
    model = segmenters[segmenter]
    with torch.no_grad():
        out = model(torch.rand(2, 3, *size))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 5, *size)
    assert out.imagenet_logits.shape == (2, 1000)
    assert out.features.shape == (2, FEATURE_DIM[segmenter]) == (2, model.backbone.feature_dim)
    assert model.num_classes == 5 and model.segmenter == segmenter


@pytest.mark.parametrize(("segmenter", "backbone"), COMBOS)
def test_layer_groups(segmenters, segmenter, backbone):
    model = segmenters[segmenter]
    groups = model.layer_groups()
    assert [name for name, _ in groups] == GROUPS[segmenter]
    ids = [id(p) for _, params in groups for p in params]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(params for _, params in groups)
    frozen = list(model.imagenet_head.parameters())
    assert frozen and all(not p.requires_grad for p in frozen)
    assert not {id(p) for p in frozen} & set(ids)
    assert model.imagenet_head is model.backbone.imagenet_head
    pretrained, task = model.pretrained_parameters(), model.task_parameters()
    assert [id(p) for p in pretrained + task] == ids
    assert [id(p) for p in task] == [id(p) for p in groups[-1][1]]
    expected = {"lraspp": (5, 128), "deeplabv3": (5, 256), "fcn8s": (5, 5 * 16 * 16), "fpn": (5, 64)}[segmenter]
    assert model.last_layer_weight.shape == expected


def test_fcn8s_groups_follow_spec(segmenters):
    model = segmenters["fcn8s"]
    head = model.head
    groups = dict(model.group_modules())
    assert groups["fc"] == [head.fc6, head.fc7]
    names = ["score_fr", "score_pool3", "score_pool4", "upscore2", "upscore_pool4", "upscore8"]
    assert groups["head"] == [getattr(head, n) for n in names]
    assert [len(groups[f"conv{i}"]) for i in range(1, 6)] == [2, 2, 3, 3, 3]  # VGG16's 13 convolutions
    assert torch.equal(model.last_layer_weight, head.upscore8.weight.flatten(1))


def test_fcn8s_initialisation(segmenters):
    head = segmenters["fcn8s"].head
    for conv in (head.score_fr, head.score_pool4, head.score_pool3):
        assert not conv.weight.any() and not conv.bias.any()
    profile4 = torch.tensor([0.25, 0.75, 0.75, 0.25])
    for up in (head.upscore2, head.upscore_pool4):
        assert up.weight.requires_grad and up.bias is None and up.stride == (2, 2)
        assert torch.equal(up.weight[3, 3], torch.outer(profile4, profile4))
        assert not up.weight[0, 1].any() and not up.weight[2, 0].any()  # channel c only feeds channel c
    up8 = head.upscore8.weight
    assert head.upscore8.stride == (8, 8) and up8.shape == (5, 5, 16, 16)
    assert up8[1, 1, 0, 0] == 0.0625**2 and up8[1, 1, 7, 7] == 0.9375**2 and up8[1, 1, 7, 8] == 0.9375**2
    assert torch.equal(up8, bilinear_kernel(5, 16))
    assert up8.sum() == 5 * 64  # bilinear x8: each output pixel is a convex combination of inputs


def test_bilinear_kernel_upsamples_linearly():
    up = torch.nn.ConvTranspose2d(1, 1, 4, stride=2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(1, 4))
        ramp = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 1, 6, 6)
        out = up(ramp)[..., 2:-2, 2:-2]  # interior, away from the borders
    assert torch.equal(out[0, 0, 0], torch.arange(2, 12) / 2 - 0.75)  # slope 1/2: linear interpolation
    assert torch.equal(out[0, 0, :, 3], out[0, 0, 0, 3].expand(10))  # constant along the constant axis


def test_fcn8s_fc_convs_are_the_vgg_classifier_reshaped(segmenters):
    model = segmenters["fcn8s"]
    head, classifier = model.head, model.backbone.imagenet_head
    assert torch.equal(head.fc6.weight, classifier[0].weight.view(4096, 512, 7, 7))
    assert torch.equal(head.fc6.bias, classifier[0].bias)
    assert torch.equal(head.fc7.weight, classifier[3].weight.view(4096, 4096, 1, 1))
    assert torch.equal(head.fc7.bias, classifier[3].bias)
    assert head.fc6.weight.data_ptr() != classifier[0].weight.data_ptr()  # trainable copies, not shared
    assert head.fc6.weight.requires_grad and not classifier[0].weight.requires_grad


@pytest.mark.slow
def test_fcn8s_needs_fcn_padding():
    with pytest.raises(ConfigError, match="padding 100"):
        FCN8sHead(vgg16("none"), 3)


@pytest.mark.slow
@pytest.mark.parametrize(("segmenter", "backbone"), COMBOS)
def test_student_imagenet_logits_equal_teacher_at_init(segmenters, segmenter, backbone):
    """Same weights, same crop: equal logits, so the KL starts at exactly 0 (a dilated student: next test)."""
    model = segmenters[segmenter]
    if segmenter == "deeplabv3":  # undilated, output stride 32
        model = build_model(_cfg(segmenter, backbone, output_stride=32), 5, task="segmentation").eval()
    teacher = make_teacher(model)
    x = torch.rand(2, 3, 67, 45)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(teacher(x), out.imagenet_logits)
    if segmenter == "fcn8s":
        assert teacher.backbone.features[0].padding == (100, 100)  # as the official teacher


def test_dilated_student_gets_an_undilated_teacher():
    """A DeepLab student at output stride 8 and its teacher, the ImageNet ResNet at stride 32 with the same weights.

    Their ImageNet logits do NOT match at init (the dilated network computes other features), so the KL starts
    above 0; the teacher matches an undilated backbone with the student's weights exactly.
    """
    torch.manual_seed(0)
    model = build_model(_cfg("deeplabv3", "resnet50", channels_last=False), 3, task="segmentation").eval()
    assert model.backbone.output_stride == 8
    teacher = make_teacher(model)
    assert teacher.backbone.output_stride == 32 and model.backbone.output_stride == 8
    plain = build_backbone("resnet50", "none").eval()
    plain.load_weights(model.backbone.state_dict(), source="student")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = plain.forward_head(plain.forward_features(plain.normalize(x)))
        student = model(x).imagenet_logits
        got = teacher(x)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, student, atol=1e-3)


def test_set_output_stride_round_trip():
    torch.manual_seed(0)
    bb = build_backbone("resnet50", "none", output_stride=8).eval()
    ref16 = build_backbone("resnet50", "none", output_stride=16).eval()
    ref16.load_weights(bb.state_dict(), source="dilated")
    params = [p.data_ptr() for p in bb.parameters()]
    bb.set_output_stride(16)
    assert bb.output_stride == 16 and [p.data_ptr() for p in bb.parameters()] == params
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(bb.forward_features(x), ref16.forward_features(x))
    with pytest.raises(ConfigError, match="output_stride=4"):
        bb.set_output_stride(4)
    with pytest.raises(ConfigError, match="only output stride 32"):
        build_backbone("efficientnet_lite0", "none").set_output_stride(16)


@pytest.mark.slow
@pytest.mark.parametrize(("segmenter", "backbone"), COMBOS)
def test_one_sgd_step_moves_head_and_backbone_only(segmenters, segmenter, backbone):
    model = copy.deepcopy(segmenters[segmenter])
    teacher = make_teacher(model)
    frozen = {k: v.clone() for k, v in model.imagenet_head.state_dict().items()}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = {name: [p.detach().clone() for p in params] for name, params in model.layer_groups()}
    batch, size = (1, 32) if segmenter == "fcn8s" else (2, 64)  # FCN-8s pads by 100: already 230 px inside
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 5, (batch, size, size))
    y[0, :4] = 255
    t = teacher(x)
    opt = torch.optim.SGD([p for _, ps in model.layer_groups() for p in ps], lr=0.1)
    out = model(x)
    # the KL's gradient is 0 at init (student == teacher): add a term that moves the backbone through the KL path
    loss = F.cross_entropy(out.logits, y, ignore_index=255) + out.imagenet_logits.logsumexp(1).mean()
    loss.backward()
    opt.step()
    after = dict(model.layer_groups())
    changed = {
        name: any(not torch.equal(a, b) for a, b in zip(ps, after[name], strict=True)) for name, ps in before.items()
    }
    assert changed["head"]
    backbone_groups = GROUPS[segmenter][:5] if segmenter == "fcn8s" else GROUPS[segmenter][:6]
    assert all(changed[name] for name in backbone_groups), changed
    if segmenter == "fcn8s":  # score_fr starts at 0, so no gradient reaches fc6/fc7 on the first step
        assert not model.head.score_fr.weight.equal(torch.zeros_like(model.head.score_fr.weight))
    assert all(torch.equal(v, frozen[k]) for k, v in model.imagenet_head.state_dict().items())
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert torch.equal(teacher(x), t)
    with torch.no_grad():
        assert not torch.equal(model(x).imagenet_logits, t)


@pytest.mark.slow
def test_default_output_strides_and_dispatch():
    cfg = ModelConfig(backbone="resnet50", weights="none", segmenter="deeplabv3", output_stride=None)
    assert build_model(cfg, 3, task="segmentation").backbone.output_stride == 8
    cfg16 = ModelConfig(backbone="resnet50", weights="none", segmenter="deeplabv3", output_stride=16)
    assert build_model(cfg16, 3, task="segmentation").backbone.output_stride == 16
    assert build_model(cfg16, 3, task="segmentation", output_stride=32).backbone.output_stride == 32
    classifier = build_model(cfg, 3)  # the classification call is unchanged
    assert isinstance(classifier, ASGClassifier) and classifier.backbone.output_stride == 32
    assert build_model(cfg16, 3).backbone.output_stride == 16  # cfg.output_stride also reaches the classifier
    lite = build_model(_cfg("lraspp", "efficientnet_lite0"), 3, task="segmentation")
    assert isinstance(lite, ASGSegmenter) and lite.backbone.output_stride == 32
    assert lite.backbone.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    plain = build_model(_cfg("lraspp", "efficientnet_lite0", channels_last=False), 3, task="segmentation")
    assert not plain.backbone.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="valid tasks are classification, segmentation"):
        build_model(cfg, 3, task="detection")


@pytest.mark.parametrize(
    ("segmenter", "backbone"),
    [("fcn8s", "resnet50"), ("deeplabv3", "efficientnet_lite0"), ("lraspp", "vgg16"), ("deeplabv3", "vgg16")],
)
def test_invalid_combinations_are_config_errors(segmenter, backbone):
    cfg = ModelConfig(backbone=backbone, weights="imagenet", segmenter=segmenter)  # raised before weights are read
    with pytest.raises(ConfigError) as err:
        build_model(cfg, 3, task="segmentation")
    msg = str(err.value)
    assert f"model.segmenter={segmenter!r}" in msg and f"model.backbone={backbone!r}" in msg
    for combo in ("fcn8s + vgg16", "deeplabv3 + resnet50|resnet101", "lraspp + efficientnet_lite0|efficientnet_lite2"):
        assert combo in msg


@pytest.mark.parametrize(
    ("segmenter", "backbone", "output_stride"), [("fcn8s", "vgg16", 8), ("lraspp", "efficientnet_lite0", 16)]
)
def test_unsupported_segmenter_output_stride(segmenter, backbone, output_stride):
    cfg = ModelConfig(backbone=backbone, weights="imagenet", segmenter=segmenter, output_stride=output_stride)
    with pytest.raises(ConfigError, match=f"output_stride={output_stride}"):
        build_model(cfg, 3, task="segmentation")


def test_fpn_head_reads_its_finest_level_and_checks_it():
    """The FPN logits come from the level of model.fpn_finest_stride: a change confined to one stride-2 pixel of
    that map moves the logits only near that pixel (stride 2), not across a stride-8 cell."""
    torch.manual_seed(0)
    model = build_model(_cfg("fpn", "efficientnet_lite0", fpn_finest_stride=2, fpn_channels=16), 3, task="segmentation")
    head = model.head
    assert model.backbone.stage_strides[head.first] == 2 and model.last_layer_weight.shape == (3, 16)
    stages = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip(model.backbone.stage_channels, (2, 4, 8, 16, 32))]
    base = head(stages, (64, 64))
    stages[0][:, :, 10, 10] += 5.0
    moved = (head(stages, (64, 64)) - base).abs().sum(1)[0] > 1e-6
    rows, cols = torch.nonzero(moved, as_tuple=True)
    assert moved.any() and rows.min() >= 14 and rows.max() <= 27 and cols.min() >= 14 and cols.max() <= 27
    with pytest.raises(ConfigError, match="fpn_finest_stride=3"):
        build_model(_cfg("fpn", "efficientnet_lite0", fpn_finest_stride=3), 3, task="segmentation")


def test_unknown_segmenter():
    with pytest.raises(ConfigError, match="valid: fcn8s, deeplabv3, lraspp"):
        build_model(ModelConfig(backbone="vgg16", weights="none", segmenter="pspnet"), 3, task="segmentation")


def test_missing_vgg_weights_name_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth")
    with pytest.raises(WeightsError) as err:
        build_backbone("vgg16")
    assert expected in str(err.value) and "model.weights" in str(err.value)
    with pytest.raises(WeightsError, match="vgg16-397923af.pth"):
        build_model(ModelConfig(backbone="vgg16", segmenter="fcn8s"), 3, task="segmentation")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / CACHE_FILE).touch()
    assert str(cached_weights_path()) == expected


@pytest.mark.slow
def test_vgg_torchvision_layout_and_imagenet_head():
    """torchvision's VGG16 state dict loads into the backbone; the ImageNet logits equal torchvision's in eval."""
    torch.manual_seed(0)
    tv = torchvision.models.vgg16(weights=None).eval()
    bb = vgg16("none").eval()
    bb.load_weights(tv.state_dict(), source="torchvision vgg16")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = bb.forward_features(bb.normalize(x))
        pooled = bb.forward_head(feats, pre_logits=True)
        assert pooled.shape == (1, 25088) and bb.feature_dim == 25088
        torch.testing.assert_close(bb.forward_head(feats), tv(bb.normalize(x)))
    assert isinstance(bb.imagenet_head, torch.nn.Sequential)
    assert [type(m).__name__ for m in bb.imagenet_head] == ["Linear", "ReLU", "Identity"] * 2 + ["Linear"]
    bb.train()  # the frozen head is a fixed function: no dropout even in train mode
    with torch.no_grad():
        assert torch.equal(bb.imagenet_head(pooled), bb.imagenet_head(pooled))
    fcn = vgg16("none", fcn=True)
    fcn.load_weights(bb.state_dict(), source="own layout")  # same keys for both variants
    assert all(torch.equal(fcn.state_dict()[k], v) for k, v in bb.state_dict().items())


@pytest.mark.slow
def test_vgg_as_a_classification_backbone():
    torch.manual_seed(0)
    model = ASGClassifier(build_backbone("vgg16", "none"), num_classes=3, hidden_dim=8).eval()
    groups = model.layer_groups()
    assert [n for n, _ in groups] == ["conv1_1", "conv1_2", "conv2", "conv3", "conv4", "conv5", "head"]
    ids = [id(p) for _, ps in groups for p in ps]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (2, 3) and out.features.shape == (2, 25088)
    assert torch.equal(make_teacher(model)(x), out.imagenet_logits)
    with pytest.raises(ConfigError, match="output_stride=16"):
        build_backbone("vgg16", "none", output_stride=16)
