"""Controllers: decisions only at window ends, seeded reproducibility, resume, divergence, factory."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch

from asg.config import Config, L2OConfig
from asg.engine.control import FixedController, StepStats
from asg.errors import ConfigError, TrainingDiverged, WeightsError
from asg.l2o import (
    L2OController,
    LRPolicy,
    RandomController,
    RandomInitController,
    Reinforce,
    build_controller,
    save_policy,
    window_lengths,
)
from asg.l2o.policy import SCALES

GROUPS = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc_new"]


pytestmark = pytest.mark.usefixtures("one_thread")


def stats(step: int, total: int, spe: int = 50, loss: float | None = None) -> StepStats:
    loss = 2.0 / (1 + 0.01 * step) if loss is None else loss
    return StepStats(step, total, loss, 0.3, 1e-3 * step, 0.05, spe)


def run(ctrl, total: int, spe: int = 50, upto: int | None = None, start: int = 1) -> dict[int, list[float]]:
    """Feed steps start..upto (default total); return {step: scales} of the decisions."""
    out = {}
    for t in range(start, (upto or total) + 1):
        scales = ctrl.after_step(stats(t, total, spe))
        if scales is not None:
            out[t] = scales
    return out


def l2o_cfg(**kw) -> L2OConfig:
    return L2OConfig(**{"window_rule": "released", "min_steps": 10, **kw})


def decision_steps(rule: str, total: int, spe: int, min_steps: int) -> list[int]:
    return list(itertools.accumulate(window_lengths(rule, total, spe, min_steps)))[:-1]


@pytest.mark.parametrize("rule", ["released", "intended"])
def test_random_controller_decides_at_window_ends_only(rule):
    total, spe = 400, 120
    ctrl = RandomController(rule, 10, spe, seed=1)
    assert ctrl.start(GROUPS, total) == [1.0] * 7  # first window at scale 1
    decisions = run(ctrl, total, spe)
    assert list(decisions) == decision_steps(rule, total, spe, 10)
    assert all(s in SCALES for scales in decisions.values() for s in scales)
    assert [h["step"] for h in ctrl.history] == [0, *decisions]
    assert len({tuple(s) for s in decisions.values()}) > 1  # a new draw each time


def test_same_seed_same_sequence_other_seed_differs():
    def seq(seed):
        ctrl = RandomController("intended", 10, 100, seed=seed)
        ctrl.start(GROUPS, 500)
        return list(run(ctrl, 500, 100).values())

    assert seq(3) == seq(3)
    assert seq(3) != seq(4)


def test_random_init_never_changes():
    ctrl = RandomInitController("released", 10, 50, seed=5)
    first = ctrl.start(GROUPS, 300)
    assert len(first) == 7 and all(s in SCALES for s in first)
    assert run(ctrl, 300) == {}
    assert ctrl.history == [{"step": 0, "scales": first}]
    other = RandomInitController("released", 10, 50, seed=5)
    assert other.start(GROUPS, 300) == first


def test_steps_per_epoch_taken_from_stats_when_not_given():
    ctrl = RandomController("released", 10, None, seed=0)
    ctrl.start(GROUPS, 200)
    assert list(run(ctrl, 200, spe=50)) == decision_steps("released", 200, 50, 10)


def make_l2o(seed=0, **kw) -> L2OController:
    torch.manual_seed(0)
    return L2OController(LRPolicy(7), l2o_cfg(**kw), steps_per_epoch=50, seed=seed)


def test_l2o_controller_window_ends_and_reproducible():
    def seq(seed):
        ctrl = make_l2o(seed=seed)
        assert ctrl.start(GROUPS, 300) == [1.0] * 7
        return run(ctrl, 300)

    a = seq(0)
    assert list(a) == decision_steps("released", 300, 50, 10)
    assert a == seq(0)
    assert a != seq(9)


def test_l2o_observation_reaches_policy():
    """The policy sees the window means and the current scales as a [1, 12] observation."""
    ctrl = make_l2o()
    seen = []
    act = ctrl.policy.act
    ctrl.policy.act = lambda obs, *a, **k: (seen.append(obs.clone()), act(obs, *a, **k))[1]
    ctrl.start(GROUPS, 100)
    for t in range(1, 11):
        ctrl.after_step(StepStats(t, 100, float(t), 0.1 * t, 0.5, -0.5, 50))
    (obs,) = seen
    expected = [5.5, 0.55, 0.055, 0.5, -0.5] + [1.0] * 7
    assert obs.shape == (1, 12)
    assert torch.allclose(obs, torch.tensor([expected]))


def test_hidden_state_carry_or_reset():
    carry = make_l2o(carry_hidden=True)
    carry.start(GROUPS, 200)
    run(carry, 200)
    assert carry.hidden.abs().sum() > 0
    reset = make_l2o(carry_hidden=False)
    reset.start(GROUPS, 200)
    run(reset, 200)
    assert reset.hidden.abs().sum() == 0


def test_argmax_when_not_sampling():
    ctrl = make_l2o(sample_actions=False)
    with torch.no_grad():
        for lin in ctrl.policy.action_distribution.linear:
            lin.bias.copy_(torch.arange(11.0))  # scale 1.0 dominates
    ctrl.start(GROUPS, 200)
    assert all(s == [1.0] * 7 for s in run(ctrl, 200).values())


def test_non_finite_statistic_raises():
    ctrl = make_l2o()
    ctrl.start(GROUPS, 100)
    ctrl.after_step(stats(1, 100))
    with pytest.raises(TrainingDiverged, match="task_loss.*step 2"):
        ctrl.after_step(stats(2, 100, loss=math.nan))
    with pytest.raises(TrainingDiverged, match="kl"):
        ctrl.after_step(StepStats(3, 100, 1.0, math.inf, 0.0, 0.1, 50))


def test_wrong_group_count_at_start():
    ctrl = L2OController(LRPolicy(5), l2o_cfg())
    with pytest.raises(WeightsError, match="5 layer-group heads.*7 groups"):
        ctrl.start(GROUPS, 100)


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", ["random", "l2o"])
@pytest.mark.parametrize("order", ["start_then_load", "load_then_start"])
def test_resume_mid_window_gives_same_sequence(kind, order):
    total, cut = 300, 37  # cut inside a window

    def make():
        if kind == "random":
            return RandomController("released", 10, 50, seed=2)
        return make_l2o(carry_hidden=True)

    full = make()
    full.start(GROUPS, total)
    expected = run(full, total)
    first = make()
    first.start(GROUPS, total)
    part = run(first, total, upto=cut)
    state = roundtrip(first.state_dict())
    second = make()
    if order == "start_then_load":
        second.start(GROUPS, total)
        second.load_state_dict(state)
    else:
        second.load_state_dict(state)
        assert second.start(GROUPS, total) == first.scales
    rest = run(second, total, start=cut + 1)
    assert {**part, **rest} == expected
    assert second.history == full.history


def test_load_state_of_other_kind_refused():
    ctrl = RandomController("released", 10, 50, seed=0)
    ctrl.start(GROUPS, 100)
    with pytest.raises(ConfigError, match="random"):
        make_l2o().load_state_dict(ctrl.state_dict())


def test_training_mode_rewards_every_window_and_updates_every_num_steps():
    torch.manual_seed(0)
    policy = LRPolicy(7)
    cfg = l2o_cfg(num_steps=3)
    learner = Reinforce(policy, lr_meta=0.1, num_steps=cfg.num_steps)
    ctrl = L2OController(policy, cfg, steps_per_epoch=50, learner=learner, kl_weight=0.5)
    before = [p.detach().clone() for p in policy.parameters()]
    ctrl.start(GROUPS, 300)
    decisions = run(ctrl, 300)
    assert len(ctrl.rewards) == len(decisions)  # the last action is rewarded at the run end
    r = ctrl.rewards[0]
    window = [stats(t, 300) for t in range(11, 21)]  # the first action governs steps 11-20
    expected = -sum(s.task_loss + 0.5 * s.kl for s in window) / 10
    assert r["step"] == 20 and r["reward"] == pytest.approx(expected)
    assert len(ctrl.updates) == math.ceil(len(decisions) / 3)  # every 3 decisions + a final flush
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_heldout_reward_uses_bound_probe():
    policy = LRPolicy(7)
    cfg = l2o_cfg(reward="neg_heldout_loss")
    ctrl = L2OController(policy, cfg, 50, learner=Reinforce(policy, num_steps=100))
    calls = []
    ctrl.bind_probe(lambda: calls.append(1) or 1.25)
    ctrl.start(GROUPS, 100)
    run(ctrl, 100)
    assert ctrl.rewards and all(r["reward"] == -1.25 for r in ctrl.rewards)
    assert len(calls) == len(ctrl.rewards)


def test_build_controller(tmp_path):
    cfg = Config()
    assert isinstance(build_controller(cfg, 100), FixedController)
    cfg.l2o.controller = "random"
    assert isinstance(build_controller(cfg, 100), RandomController)
    cfg.l2o.controller = "random-init"
    assert isinstance(build_controller(cfg, 100), RandomInitController)
    cfg.l2o.controller = "l2o"
    cfg.l2o.policy = str(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="missing.safetensors"):
        build_controller(cfg, 100)
    save_policy(LRPolicy(7), tmp_path / "p.safetensors")
    cfg.l2o.policy = str(tmp_path / "p.safetensors")
    cfg.l2o.steps_per_epoch = 30
    ctrl = build_controller(cfg, 100)
    assert isinstance(ctrl, L2OController) and ctrl.steps_per_epoch == 30
    ctrl.start(GROUPS, 100)
    assert list(run(ctrl, 100, spe=100)) == decision_steps(cfg.l2o.window_rule, 100, 30, cfg.l2o.min_steps)


def test_controller_seed_depends_on_train_seed():
    cfg = Config(l2o=L2OConfig(controller="random"))
    a = build_controller(cfg, 50)
    cfg.train.seed = 1
    b = build_controller(cfg, 50)
    assert a.seed != b.seed
