import numpy as np
import pytest
import torch

from asg.config import OptimConfig, config_to_dict, load_config
from asg.engine.evaluation.metrics import EvalResult
from asg.engine.optim import LRInMomentumSGD, build_optimizer
from asg.engine.sampler import EpochBatchSampler
from asg.engine.schedule import build_schedule, warmup_poly_floor
from asg.errors import ConfigError
from asg.models.inference import predict_scores
from asg.tasks.base import confusion_matrix


def test_schedule_values_at_key_steps():
    T = 1000
    assert warmup_poly_floor(0, T) == pytest.approx(0.01)
    assert warmup_poly_floor(100, T) == pytest.approx((1 - 100 / T) ** 0.9)
    assert warmup_poly_floor(800, T) == pytest.approx(0.2**0.9)
    assert warmup_poly_floor(T, T) == pytest.approx(0.2**0.9)  # floored after 0.8 T
    assert warmup_poly_floor(50, T) == pytest.approx((0.01 + 0.99 * 0.25) * (1 - 0.05) ** 0.9)
    assert build_schedule(OptimConfig(schedule="constant"), T)(500) == 1.0
    assert build_schedule(OptimConfig(schedule="warmup_poly"), T)(900) == pytest.approx(0.1**0.9)


def test_mean_per_class_accuracy_on_hand_made_confusion():
    cm = np.array([[8, 2, 0], [0, 1, 1], [0, 0, 0]])  # class 2 absent from the set
    r = EvalResult(cm).to_dict()
    assert r["acc"] == pytest.approx(9 / 12)
    assert r["per_class"] == [0.8, 0.5, None]
    assert r["mean_class_acc"] == pytest.approx(0.65)
    got = confusion_matrix(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 0]), 3)
    assert got.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


class _Model(torch.nn.Module):
    """Logits = mean of the left half minus mean of the right half (class 0) and its negative."""

    def forward(self, x):
        w = x.shape[3] // 2
        d = x[..., :w].mean(dim=(1, 2, 3)) - x[..., w:].mean(dim=(1, 2, 3))

        class Out:
            logits = torch.stack([d, -d], dim=1)

        return Out()


def test_flip_tta_averages_sigmoids_of_image_and_mirror():
    x = torch.zeros(1, 3, 4, 4)
    x[..., :2] = 1.0  # bright left half
    plain = predict_scores(_Model(), x, tta_flip=False)
    assert plain.argmax(1).item() == 0
    tta = predict_scores(_Model(), x, tta_flip=True)
    # the mirror has the opposite logits, so the sigmoid average is exactly 0.5 for both classes
    assert torch.allclose(tta, torch.full_like(tta, 0.5))
    d = 1.0
    expected = (torch.sigmoid(torch.tensor([d, -d])) + torch.sigmoid(torch.tensor([-d, d]))) / 2
    assert torch.allclose(tta[0], expected)


def test_lr_in_momentum_sgd_folds_lr_into_velocity():
    p = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LRInMomentumSGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.tensor([1.0])
    opt.step()  # buf = 0.1
    assert p.item() == pytest.approx(0.9)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()  # buf = 0.9 * 0.1 + 0 -> the group still moves at lr 0
    assert p.item() == pytest.approx(0.9 - 0.09)


def test_layer_groups_get_backbone_multiplier():
    groups = [("stem", [torch.nn.Parameter(torch.zeros(1))]), ("head", [torch.nn.Parameter(torch.zeros(1))])]
    opt = build_optimizer(groups, OptimConfig(lr=0.01, backbone_lr_mult=0.1))
    assert [g["base_lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.01])
    assert [g["name"] for g in opt.param_groups] == ["stem", "head"]


def test_sampler_resumes_mid_epoch_with_identical_batches():
    full = list(EpochBatchSampler(10, 3, seed=7, total_steps=9))
    tail = list(EpochBatchSampler(10, 3, seed=7, start_step=5, total_steps=9))
    assert full[5:] == tail
    assert sorted(sum(full[:4], [])) == list(range(10))  # one epoch = a permutation, last batch partial


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="optim.sgd: 'adam' is not one of torch, lr_in_momentum"):
        load_config(None, ["optim.sgd=adam"])  # registry names: tests/test_config.py
    bad = tmp_path / "r.yaml"
    bad.write_text("optim: {lr: 0.1}\nmodle: {}\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(bad)


def test_confusion_leaves_out_the_ignore_label_and_gives_iou():
    labels = torch.tensor([[0, 0, 255], [1, 2, 255]])  # a 2x3 "label map" with two ignored pixels
    preds = torch.tensor([[0, 1, 2], [1, 1, 0]])
    conf = confusion_matrix(labels, preds, 3, ignore_index=255)
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    seg = EvalResult(conf, task="segmentation")
    # IoU = tp / (tp + fp + fn): class 0: 1/(1+0+1), class 1: 1/(1+2+0), class 2: 0/(0+0+1)
    assert seg.to_dict()["per_class_iou"] == pytest.approx([0.5, 1 / 3, 0.0])
    assert seg.primary == seg.to_dict()["miou"] == pytest.approx((0.5 + 1 / 3) / 3)
    assert seg.to_dict()["pixel_acc"] == pytest.approx(2 / 4)
    assert EvalResult(conf).primary == EvalResult(conf).to_dict()["mean_class_acc"]  # classification's headline
    assert confusion_matrix(torch.tensor([255]), torch.tensor([0]), 256).sum() == 1  # no ignore by default


def test_retention_with_precomputed_teacher_logits_equals_the_live_teacher():
    from asg.engine.evaluation.retention import imagenet_retention, teacher_photo_logits
    from asg.models import build_model, make_teacher

    model = build_model(load_config(None).model, 3)
    teacher = make_teacher(model)
    with torch.no_grad():
        model.head[0].weight.add_(0.5)  # the task head moves; the ImageNet head and the features do not
        next(model.backbone.parameters()).mul_(1.1)  # the features do: the two predictions now differ
    photos = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    live = imagenet_retention(model, teacher, photos, batch_size=2)
    cached = imagenet_retention(model, teacher_photo_logits(teacher, photos, batch_size=4), photos, batch_size=2)
    assert live["kl"] > 0 and cached == pytest.approx(live, rel=1e-6, abs=1e-7)


def test_adamw_keeps_the_layer_group_rates():
    groups = [("stem", [torch.nn.Parameter(torch.ones(2))]), ("head", [torch.nn.Parameter(torch.ones(3))])]
    opt = build_optimizer(groups, OptimConfig(optimizer="adamw", lr=0.01, backbone_lr_mult=0.1, momentum=0.8))
    assert isinstance(opt, torch.optim.AdamW)
    assert [(g["name"], g["base_lr"]) for g in opt.param_groups] == [("stem", 0.01 * 0.1), ("head", 0.01)]
    assert opt.param_groups[0]["betas"] == (0.8, 0.999)
    groups[1][1][0].grad = torch.ones(3)
    opt.step()  # Adam's first step moves each coordinate by lr (its gradient's sign), plus the decoupled decay
    expected = 1.0 - 0.01 - 0.01 * opt.param_groups[1]["weight_decay"]
    assert torch.allclose(groups[1][1][0].detach(), torch.full((3,), expected), atol=1e-6)
    assert torch.equal(groups[0][1][0].detach(), torch.ones(2))  # no gradient: untouched


def test_old_recipes_and_run_folders_keep_loading_with_todays_names(tmp_path):
    old = tmp_path / "old.yaml"  # keys of earlier releases: teacher fields under method, lr_controller, selection
    old.write_text(
        "lr_controller: random\nmethod: {name: asg, teacher_cache: true, teacher_cache_storage: fp16, "
        "teacher_fuse_bn: false}\neval: {selection: oracle, tta_flip: true}\ntrain: {amp: true}\n"
    )
    cfg = load_config(old)
    assert (cfg.l2o.controller, cfg.teacher.cache, cfg.teacher.cache_storage, cfg.teacher.fuse_bn) == (
        "random",
        True,
        "fp16",
        False,
    )
    assert cfg.eval.tta_flip and cfg.train.precision == "bf16"
    new = load_config(
        None,
        [
            "l2o.controller=random",
            "teacher.cache=true",
            "teacher.cache_storage=fp16",
            "teacher.fuse_bn=false",
            "eval.tta_flip=true",
            "train.precision=bf16",
        ],
    )
    assert config_to_dict(cfg) | {"name": ""} == config_to_dict(new) | {"name": ""}
    # an old-style --set on a new-style recipe is applied, not ignored
    assert load_config("digits_asg", ["method.teacher_cache_storage=memory"]).teacher.cache_storage == "memory"
