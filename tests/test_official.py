"""The official ASG release's GTA5 FCN-8s VGG16 checkpoint and L2O policy files, written here in the release's
layout (names, containers, shapes) from tensors the test makes, then read by ``model.init_from`` / ``l2o.policy``.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from asg.config import Config, ModelConfig
from asg.errors import WeightsError
from asg.l2o.controllers import build_controller
from asg.l2o.policy import SCALES, load_policy
from asg.models.official import load_official_checkpoint, official_fcn8s_to_own

# the release's FCN-8s layers after the 13 VGG16 convolutions, with their kernel sizes and whether they have a bias
RELEASE_HEAD = {
    "fc6": (7, True),
    "fc7": (1, True),
    "score_fr": (1, True),
    "score_pool3": (1, True),
    "score_pool4": (1, True),
    "upscore2": (4, False),
    "upscore_pool4": (4, False),
    "upscore8": (16, False),
}


def release_conv_names(features: nn.Sequential) -> dict[str, int]:
    """The release's names of torchvision's VGG16 convolutions (``conv{block}_{n}``, blocks ended by max pools)
    -> their index in ``features``."""
    names, block, n = {}, 1, 0
    for idx, layer in enumerate(features):
        if isinstance(layer, nn.MaxPool2d):
            block, n = block + 1, 0
        elif isinstance(layer, nn.Conv2d):
            n += 1
            names[f"conv{block}_{n}"] = idx
    return names


def test_fcn8s_names_map_to_the_vgg_features_and_head():
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # VGG16's, without classifier
    convs = release_conv_names(features)
    assert len(convs) == 13
    official = {f"{name}.{p}": torch.zeros(1) for name in convs for p in ("weight", "bias")}
    official |= {f"{name}.weight": torch.zeros(1) for name in RELEASE_HEAD}
    official |= {f"{name}.bias": torch.zeros(1) for name, (_, bias) in RELEASE_HEAD.items() if bias}
    assert len(official) == 39
    expected = {f"backbone.features.{idx}.{p}" for idx in convs.values() for p in ("weight", "bias")}
    expected |= {f"head.{k}" for k in official if k.split(".")[0] in RELEASE_HEAD}
    assert set(official_fcn8s_to_own(official)) == expected
    assert set(official_fcn8s_to_own({f"module.{k}": v for k, v in official.items()})) == expected


def test_an_official_file_of_neither_layout_is_refused(tmp_path):
    path = tmp_path / "other.pth.tar"
    torch.save({"epoch": 3, "state_dict": {"encoder.weight": torch.zeros(2)}, "best_mIoU": 1.0}, path)
    with pytest.raises(WeightsError, match=r"other\.pth\.tar.*neither an 'fc_new'.*nor 'score_fr'"):
        load_official_checkpoint(nn.Linear(2, 2), path)


@pytest.mark.slow
def test_official_gta5_fcn8s_checkpoint_loads(tmp_path, capsys):
    """A file in the release's GTA5 layout ({'epoch', 'state_dict', 'best_mIoU'}; conv1_1 ... conv5_3, fc6, fc7,
    score_*, upscore*; no ImageNet classifier), written from this package's FCN-8s with random tensors; each lands
    where it belongs, the ImageNet guidance head is left as it was, and a file for other classes is refused."""
    from asg.engine.rundir.init_from import load_init_weights
    from asg.models.build import build_model

    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(backbone="vgg16", segmenter="fcn8s", weights="none", channels_last=False)
    model = build_model(cfg.model, 3, task="segmentation")
    convs = release_conv_names(model.backbone.features)
    release_to_module = {name: model.backbone.features[idx] for name, idx in convs.items()}
    release_to_module |= {name: getattr(model.head, name) for name in RELEASE_HEAD}
    official = {}
    with torch.no_grad():
        for name, module in release_to_module.items():
            for p_name, p in module.named_parameters():
                p.uniform_(-1, 1)  # distinct values everywhere (the model's biases and scores start at zero)
                official[f"{name}.{p_name}"] = p
    assert len(official) == 39
    assert official["fc6.weight"].shape == (4096, 512, 7, 7) and official["upscore8.weight"].shape == (3, 3, 16, 16)
    path = tmp_path / "vgg16_segmentation_best.pth.tar"
    torch.save({"epoch": 50, "state_dict": official, "best_mIoU": 37.3}, path)
    del official
    guidance = {k: v.clone() for k, v in model.backbone.imagenet_head.state_dict().items() if k.startswith("6.")}
    guidance_sum = model.backbone.imagenet_head[0].weight.double().sum()
    with torch.no_grad():
        for module in release_to_module.values():
            for p in module.parameters():
                p.zero_()

    cfg.model.init_from = str(path)
    assert load_init_weights(model, cfg, 3, task="segmentation") == str(path)
    out = capsys.readouterr().out
    assert "FCN-8s VGG16" in out and "epoch 50" in out and "best_mIoU 37.3" in out and "3 classes" in out
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    for name, module in release_to_module.items():
        for p_name, p in module.named_parameters():
            assert torch.equal(p, saved[f"{name}.{p_name}"]), f"{name}.{p_name}"
    for k, v in guidance.items():
        assert torch.equal(model.backbone.imagenet_head.state_dict()[k], v)
    assert model.backbone.imagenet_head[0].weight.double().sum() == guidance_sum

    other = tmp_path / "nineteen.pth.tar"
    state = {"score_fr.weight": torch.zeros(19, 4096, 1, 1), "score_fr.bias": torch.zeros(19)}
    state["conv1_1.bias"] = saved["conv1_1.bias"]
    torch.save({"epoch": 1, "state_dict": state, "best_mIoU": 0.0}, other)
    with pytest.raises(WeightsError, match=r"nineteen\.pth\.tar .*does not fit.*shape mismatch 2: head\.score_fr"):
        load_official_checkpoint(model, other)


# ---- L2O policy files -------------------------------------------------------------------------------------------


def release_policy_state(groups: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """The release's policy state dict, from the modules it is made of: an ``nn.LSTM(1, 20)`` per statistic (its
    own parameter names), a ``Linear(101, 11)`` per layer group, a ``Linear(groups * 101, 1)`` critic."""
    torch.manual_seed(seed)
    state = {}
    for i in range(5):
        for k, v in nn.LSTM(1, 20).state_dict().items():
            state[f"net.state_encoder.{i}.rnn.{k}"] = torch.randn_like(v)
    for g in range(groups):
        state[f"action_distribution.linear.{g}.weight"] = torch.randn(11, 101)
        state[f"action_distribution.linear.{g}.bias"] = torch.randn(11)
    state["critic.fc.weight"] = torch.randn(1, groups * 101)
    state["critic.fc.bias"] = torch.randn(1)
    return state


def expected_probs(state: dict[str, torch.Tensor], observations: list[torch.Tensor], groups: int) -> list:
    """The action probabilities the release's policy gives from ``state``: each statistic through its own LSTM
    (state carried between steps), the 5 outputs concatenated, group g's current scale appended, group g's linear
    layer, softmax over the 11 scales."""
    lstms = []
    for i in range(5):
        lstm = nn.LSTM(1, 20)
        lstm.load_state_dict(
            {
                k[len(f"net.state_encoder.{i}.rnn.") :]: v
                for k, v in state.items()
                if k.startswith(f"net.state_encoder.{i}.rnn.")
            }
        )
        lstms.append(lstm)
    hidden = [None] * 5
    result = []
    with torch.no_grad():
        for obs in observations:
            outs = []
            for i, lstm in enumerate(lstms):
                out, hidden[i] = lstm(obs[i].view(1, 1, 1), hidden[i])
                outs.append(out.view(-1))
            enc = torch.cat(outs)
            probs = []
            for g in range(groups):
                feats = torch.cat([enc, obs[5 + g].view(1)])
                w, b = state[f"action_distribution.linear.{g}.weight"], state[f"action_distribution.linear.{g}.bias"]
                probs.append(torch.softmax(w @ feats + b, dim=0))
            result.append(torch.stack(probs))
    return result


def policy_probs(policy, observations: list[torch.Tensor]) -> list:
    hidden, result = None, []
    with torch.no_grad():
        for obs in observations:
            logits, _, hidden = policy(obs.unsqueeze(0), hidden)
            result.append(logits.softmax(-1))
    return result


OBSERVATIONS = [
    torch.tensor([2.4, 0.3, 0.05, 0.001, 0.04, 1.0, 1.0, 0.5, 0.2, 1.0, 0.7, 0.1]),
    torch.tensor([1.9, 0.4, 0.10, 0.002, 0.05, 0.3, 0.9, 0.0, 1.0, 0.6, 0.7, 0.8]),
]


@pytest.mark.parametrize("critic", [True, False])
def test_official_policy_file_loads_and_acts_as_released(tmp_path, capsys, critic):
    state = release_policy_state()
    if not critic:  # the release loads a policy file into a fresh policy with state.update: parts may be absent
        state = {k: v for k, v in state.items() if not k.startswith("critic.")}
    path = tmp_path / "policy_vgg16_segmentation.pth"
    torch.save(state, path)
    policy = load_policy(path, 7)
    out = capsys.readouterr().out
    assert "official ASG L2O policy" in out and "5 LSTM encoders (hidden 20), 7 layer-group heads" in out
    assert ("critic present" in out) == critic
    own = policy.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    assert SCALES[-1] == 1.0 and policy.action_distribution.linear[0].weight.shape == (len(SCALES), 101)
    for got, want in zip(policy_probs(policy, OBSERVATIONS), expected_probs(state, OBSERVATIONS, 7), strict=True):
        torch.testing.assert_close(got, want)


def test_official_policy_file_in_a_container_with_module_prefix(tmp_path):
    state = release_policy_state(groups=4, seed=1)
    path = tmp_path / "policy.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    policy = load_policy(path, None)
    assert policy.num_groups == 4
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in state.items())


def test_l2o_policy_setting_takes_an_official_file(tmp_path):
    state = release_policy_state()
    path = tmp_path / "policy_res101_vista17.pth"
    torch.save(state, path)
    cfg = Config()
    cfg.l2o.controller, cfg.l2o.policy = "l2o", str(path)
    controller = build_controller(cfg, steps_per_epoch=100)
    assert torch.equal(controller.policy.action_distribution.linear[3].bias, state["action_distribution.linear.3.bias"])


def test_official_policy_file_without_an_encoder_or_with_other_names_is_refused(tmp_path):
    state = release_policy_state()
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("net.state_encoder.2.")}, path)
    with pytest.raises(WeightsError, match=r"partial\.pth: .*without its LSTM encoders.*state_encoder\.2"):
        load_policy(path, 7)
    torch.save({**state, "actor.fc.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"partial\.pth: not an L2O policy file.*actor\.fc\.weight"):
        load_policy(path, 7)


def test_asg_evaluate_takes_an_official_file_with_a_recipe(tmp_path, capsys):
    """`asg evaluate FILE --config RECIPE`: an official VisDA-layout classifier evaluated on an image folder."""
    import torchvision
    from PIL import Image

    from asg.cli import main

    for split, n in (("train", 4), ("real", 3)):
        for i in range(n):
            folder = tmp_path / "root" / split / ("cat" if i % 2 else "dog")
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (40 * i, 90, 200 - 30 * i)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    fc_new = torch.nn.Sequential(torch.nn.Linear(2048, 512), torch.nn.ReLU(), torch.nn.Linear(512, 2))
    state = {**net.state_dict(), **{f"fc_new.{k}": v for k, v in fc_new.state_dict().items()}}
    official = tmp_path / "release" / "res50_best.pth.tar"
    official.parent.mkdir()
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_prec1": 50.0}, official)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"data: {{name: imagefolder, root: {tmp_path / 'root'}, image_size: 32, source_val_fraction: 0.0}}\n"
        "model: {backbone: resnet50, weights: none, channels_last: false}\n"
    )
    assert main(["evaluate", str(official), "--config", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "official ASG checkpoint" in out and "epoch 7" in out and "real" in out
    assert list(official.parent.glob("eval_res50_best*.json"))  # beside the file (or --out)
    assert main(["evaluate", str(official)]) == 2  # a weight file without its recipe: one clear line
    assert "pass --config RECIPE" in capsys.readouterr().err
