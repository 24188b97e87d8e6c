"""REINFORCE: returns, update direction, a toy problem where scale 0.7 is best."""

from __future__ import annotations

import pytest
import torch

from asg.l2o.policy import SCALES, LRPolicy
from asg.l2o.reinforce import Reinforce, discounted_returns

BEST = SCALES.index(0.7)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_discounted_returns():
    assert discounted_returns([1.0, 2.0, 3.0], 0.0).tolist() == [1.0, 2.0, 3.0]
    assert discounted_returns([1.0, 2.0, 3.0], 0.5).tolist() == pytest.approx([1 + 0.5 * (2 + 0.5 * 3), 3.5, 3.0])


def prob_of(policy: LRPolicy, obs: torch.Tensor, action: int) -> torch.Tensor:
    with torch.no_grad():
        return policy(obs)[0].softmax(-1)[:, action]


def test_update_raises_probability_of_rewarded_action():
    torch.manual_seed(0)
    policy = LRPolicy(2)
    learner = Reinforce(policy, lr_meta=0.1, num_steps=1)
    obs = torch.tensor([[1.0, 0.1, 0.5, 0.0, 0.1, 1.0, 1.0]])
    _, actions, log_prob, entropy, _ = policy.act(obs, None)
    before = policy(obs)[0].softmax(-1).gather(1, actions.view(-1, 1)).detach()
    learner.add(log_prob, entropy, reward=1.0)
    assert learner.ready()
    info = learner.update()
    after = policy(obs)[0].softmax(-1).gather(1, actions.view(-1, 1)).detach()
    assert (after > before).all()
    assert info["mean_reward"] == 1.0 and learner.updates == 1
    assert learner.update() is None  # the rollout was cleared


def test_toy_problem_learns_best_scale():
    """Reward -mean_g |scale_g - 0.7| with random observations: p(0.7) climbs far above 1/11."""
    torch.manual_seed(0)
    groups = 3
    policy = LRPolicy(groups)
    learner = Reinforce(policy, lr_meta=0.05, gamma=0.0, num_steps=5, baseline=True, baseline_momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    scales = [1.0] * groups
    rewards = []
    for _ in range(300):
        for _ in range(5):
            obs = torch.cat([torch.rand(1, 5, generator=gen), torch.tensor([scales])], dim=1)
            scales, _, log_prob, entropy, _ = policy.act(obs, None, generator=gen)
            reward = -sum(abs(s - 0.7) for s in scales) / groups
            learner.add(log_prob, entropy, reward)
        rewards.append(learner.update()["mean_reward"])
    p_best = prob_of(policy, obs, BEST)
    assert (p_best > 0.4).all(), p_best  # uniform is 1/11 = 0.09
    assert sum(rewards[-50:]) / 50 > sum(rewards[:50]) / 50 + 0.05


def test_entropy_bonus_keeps_policy_uniform():
    """With only the entropy term (zero rewards) an update cannot lower the entropy."""
    policy = LRPolicy(2)
    learner = Reinforce(policy, lr_meta=0.5, num_steps=1, entropy_coef=1.0)
    obs = torch.tensor([[1.0, 0.1, 0.5, 0.0, 0.1, 1.0, 1.0]])
    with torch.no_grad():
        policy.action_distribution.linear[0].bias.copy_(torch.arange(11.0) / 5)
    ent_before = policy.act(obs, None)[3].item()
    _, _, log_prob, entropy, _ = policy.act(obs, None)
    learner.add(log_prob, entropy, 0.0)
    learner.update()
    assert policy.act(obs, None)[3].item() > ent_before


def test_baseline_and_state_dict_roundtrip():
    policy = LRPolicy(2)
    learner = Reinforce(policy, lr_meta=0.01, num_steps=2, baseline=True, baseline_momentum=0.5)
    obs = torch.tensor([[1.0, 0.1, 0.5, 0.0, 0.1, 1.0, 1.0]])
    for r in (-2.0, -4.0):
        _, _, lp, ent, _ = policy.act(obs, None)
        learner.add(lp, ent, r)
    info = learner.update()
    assert info["baseline"] == -3.0  # first update: baseline = mean return, so advantages are centred
    assert learner.baseline == -3.0
    state = learner.state_dict()
    other = Reinforce(LRPolicy(2), lr_meta=0.01, num_steps=2, baseline=True)
    other.optimizer = torch.optim.SGD(policy.parameters(), lr=0.01, momentum=0.9)
    other.load_state_dict(state)
    assert other.baseline == -3.0 and other.updates == 1
    assert other.optimizer.state_dict()["state"].keys() == learner.optimizer.state_dict()["state"].keys()


def test_rewards():
    from asg.errors import ConfigError
    from asg.l2o.observation import WindowSummary
    from asg.l2o.rewards import REWARDS, RewardContext, get_reward

    prev = WindowSummary(10, task_loss=2.0, kl=1.0, progress=0.1, last_weight_mean=0, last_weight_std=1, end_step=10)
    cur = WindowSummary(10, task_loss=1.5, kl=2.0, progress=0.2, last_weight_mean=0, last_weight_std=1, end_step=20)
    ctx = RewardContext(previous=prev, kl_weight=0.1, probe=lambda: 0.75)
    assert REWARDS["neg_train_loss"](cur, ctx) == pytest.approx(-(1.5 + 0.1 * 2.0))
    assert REWARDS["neg_heldout_loss"](cur, ctx) == -0.75
    assert REWARDS["loss_decrease"](cur, ctx) == pytest.approx((2.0 + 0.1) - (1.5 + 0.2))
    assert REWARDS["loss_decrease"](cur, RewardContext(None, 0.1, None)) == 0.0
    with pytest.raises(ConfigError, match="probe"):
        REWARDS["neg_heldout_loss"](cur, RewardContext(prev, 0.1, None))
    with pytest.raises(ConfigError, match="neg_train_loss"):
        get_reward("accuracy")


def test_normalised_advantages_learn_from_tiny_rewards():
    """Rewards of order 1e-3 (like a window's loss drop) still teach the policy when advantages are normalised."""
    import torch

    from asg.l2o.policy import SCALES, LRPolicy
    from asg.l2o.reinforce import Reinforce

    torch.manual_seed(0)
    policy = LRPolicy(2)
    learner = Reinforce(policy, lr_meta=0.02, baseline=True, normalize=True, num_steps=5)
    obs = torch.zeros(1, 7)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        for _ in range(5):
            scales, _, log_prob, entropy, _ = policy.act(obs, None, generator=g)
            learner.add(log_prob, entropy, -1e-3 * sum(abs(s - 1.0) for s in scales))
        learner.update()
    logits, _, _ = policy(obs, None)
    probs = torch.softmax(logits, dim=-1)
    top = [SCALES.index(0.9), SCALES.index(1.0)]
    assert float(probs[:, top].sum(dim=-1).min()) > 0.5  # uniform would give 2/11
