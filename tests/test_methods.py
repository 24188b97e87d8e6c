import math

import pytest
import torch

from asg.config import MethodConfig
from asg.errors import ConfigError
from asg.methods import METHODS, build_method, kl_teacher_student


def test_kl_value_and_direction_on_toy_logits():
    teacher = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    student = torch.log(torch.tensor([[0.4, 0.4, 0.2]]))
    expected = sum(p * math.log(p / q) for p, q in zip([0.7, 0.2, 0.1], [0.4, 0.4, 0.2]))  # KL(t || s)
    reverse = sum(q * math.log(q / p) for p, q in zip([0.7, 0.2, 0.1], [0.4, 0.4, 0.2]))  # KL(s || t)
    got = float(kl_teacher_student(teacher, student))
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(got - reverse) > 1e-3  # the direction matters and is teacher -> student


def test_kl_is_batch_mean_and_matches_kldivloss():
    torch.manual_seed(0)
    t, s = torch.randn(5, 1000), torch.randn(5, 1000)
    ref = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(s, 1), torch.softmax(t, 1))
    assert float(kl_teacher_student(t, s)) == pytest.approx(float(ref), rel=1e-5)
    assert float(kl_teacher_student(t, t)) == pytest.approx(0.0, abs=1e-6)


class _Out:
    def __init__(self, logits, imagenet_logits):
        self.logits, self.imagenet_logits = logits, imagenet_logits


def test_asg_loss_is_ce_plus_weighted_kl_and_cap():
    torch.manual_seed(1)
    out = _Out(torch.randn(4, 3), torch.randn(4, 1000))
    teacher, y = torch.randn(4, 1000), torch.tensor([0, 1, 2, 0])
    ce = torch.nn.functional.cross_entropy(out.logits, y)
    kl = kl_teacher_student(teacher, out.imagenet_logits)
    lo = build_method(MethodConfig(name="asg", kl_weight=2.5)).loss(out, y, teacher)
    assert float(lo.loss) == pytest.approx(float(ce + 2.5 * kl), rel=1e-5)
    capped = build_method(MethodConfig(name="asg", kl_weight=100.0, kl_cap=0.5)).loss(out, y, teacher)
    assert float(capped.loss) == pytest.approx(float(ce) + 0.5, rel=1e-5)


def test_l2sp_penalises_distance_from_pretrained():
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(3, 2)
    method = build_method(MethodConfig(name="l2sp", l2sp_alpha=0.5))
    method.setup(model)
    out, y = _Out(torch.zeros(2, 3), torch.zeros(2, 1000)), torch.tensor([0, 1])
    base = float(method.loss(out, y, None).loss)
    with torch.no_grad():
        model.backbone.weight.add_(1.0)  # 6 weights moved by 1 -> ||w - w0||^2 = 6
    assert float(method.loss(out, y, None).loss) == pytest.approx(base + 0.25 * 6, rel=1e-5)


def test_unknown_method_names_choices():
    with pytest.raises(ConfigError, match="erm"):
        build_method(MethodConfig(name="nope"))
    assert set(METHODS) >= {"erm", "asg", "l2sp"}
