"""LRPolicy: shapes, near-uniform start, official parameter names, policy files."""

from __future__ import annotations

import math

import pytest
import torch

from asg.errors import WeightsError
from asg.l2o.policy import SCALES, LRPolicy, load_policy, save_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def official_state_dict(num_groups: int = 7) -> dict[str, torch.Tensor]:
    """A state dict written by hand with the released names and shapes (docs/l2o.md, "Faithful to the release")."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(5):
        p = f"net.state_encoder.{i}.rnn."
        state[p + "weight_ih_l0"] = torch.randn(80, 1, generator=g)
        state[p + "weight_hh_l0"] = torch.randn(80, 20, generator=g)
        state[p + "bias_ih_l0"] = torch.randn(80, generator=g)
        state[p + "bias_hh_l0"] = torch.randn(80, generator=g)
    for k in range(num_groups):
        state[f"action_distribution.linear.{k}.weight"] = torch.randn(11, 101, generator=g)
        state[f"action_distribution.linear.{k}.bias"] = torch.randn(11, generator=g)
    state["critic.fc.weight"] = torch.randn(1, num_groups * 101, generator=g)
    state["critic.fc.bias"] = torch.randn(1, generator=g)
    return state


def obs(num_groups: int = 7) -> torch.Tensor:
    return torch.tensor([[2.4, 0.3, 0.05, 0.001, 0.04] + [1.0] * num_groups])


def test_scales_are_the_eleven_tenths():
    assert SCALES == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@pytest.mark.parametrize("groups", [3, 7])
def test_shapes(groups):
    policy = LRPolicy(groups)
    logits, value, hidden = policy(obs(groups), None)
    assert logits.shape == (groups, 11)
    assert value.shape == (1,)
    assert hidden.shape == (5, 2, 20)
    scales, actions, log_prob, entropy, hidden2 = policy.act(obs(groups), hidden)
    assert len(scales) == groups and all(s in SCALES for s in scales)
    assert actions.shape == (groups,) and actions.dtype == torch.long
    assert log_prob.shape == () and entropy.shape == ()
    assert hidden2.shape == (5, 2, 20)
    assert not torch.equal(hidden2, hidden)  # the LSTM state does move


def test_initial_policy_is_near_uniform():
    torch.manual_seed(0)
    policy = LRPolicy(7)
    logits, _, _ = policy(obs(), None)
    probs = logits.softmax(-1)
    assert torch.allclose(probs, torch.full_like(probs, 1 / 11), atol=2e-3)
    _, _, log_prob, entropy, _ = policy.act(obs(), None)
    assert entropy.item() == pytest.approx(math.log(11), abs=1e-3)  # per group
    assert log_prob.item() == pytest.approx(7 * math.log(1 / 11), abs=0.05)  # summed over groups


def test_init_is_orthogonal_with_zero_biases():
    policy = LRPolicy(7)
    rnn = policy.net.state_encoder[0].rnn
    assert torch.count_nonzero(rnn.bias_ih_l0) == 0 and torch.count_nonzero(rnn.bias_hh_l0) == 0
    w = rnn.weight_hh_l0  # [80, 20]: orthonormal columns
    assert torch.allclose(w.T @ w, torch.eye(20), atol=1e-5)
    head = policy.action_distribution.linear[0].weight  # [11, 101], gain 0.01
    assert torch.allclose(head @ head.T, 1e-4 * torch.eye(11), atol=1e-8)


def test_official_parameter_names_load_strict():
    state = official_state_dict()
    policy = LRPolicy(7)
    assert set(policy.state_dict()) == set(state)
    policy.load_state_dict(state, strict=True)
    assert torch.equal(policy.critic.fc.weight, state["critic.fc.weight"])


def test_load_released_style_pth(tmp_path):
    state = official_state_dict()
    path = tmp_path / "policy_res101_vista17.pth"
    torch.save(state, path)
    policy = load_policy(path, 7)
    assert torch.equal(policy.action_distribution.linear[6].bias, state["action_distribution.linear.6.bias"])


def test_safetensors_roundtrip(tmp_path):
    policy = LRPolicy(4)
    with torch.no_grad():
        policy.action_distribution.linear[2].bias.add_(1.0)
    path = tmp_path / "p.safetensors"
    save_policy(policy, path)
    loaded = load_policy(path, 4)
    assert loaded.num_groups == 4
    for (k, a), b in zip(policy.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert load_policy(path, None).num_groups == 4
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temp file left behind


def test_wrong_group_count_raises(tmp_path):
    path = tmp_path / "p.safetensors"
    save_policy(LRPolicy(7), path)
    with pytest.raises(WeightsError, match=r"expected 5 .*found 7"):
        load_policy(path, 5)


def test_wrong_architecture_raises(tmp_path):
    path = tmp_path / "p.safetensors"
    save_policy(LRPolicy(7, hidden=32), path)
    with pytest.raises(WeightsError, match="weight_hh_l0: expected"):
        load_policy(path, 7)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="nope.safetensors"):
        load_policy(path, 7)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(LRPolicy(7), path)  # a whole pickled module, not a state dict
    with pytest.raises(WeightsError, match="weights-only"):
        load_policy(path, 7)


def test_deterministic_act_is_argmax_and_sampling_is_seeded():
    policy = LRPolicy(7)
    with torch.no_grad():
        for k, lin in enumerate(policy.action_distribution.linear):
            lin.bias.copy_(torch.arange(11.0) * (1 if k % 2 else -1))
    scales, _, _, _, _ = policy.act(obs(), None, deterministic=True)
    assert scales == [0.0 if k % 2 == 0 else 1.0 for k in range(7)]
    draws = [policy.act(obs(), None, generator=torch.Generator().manual_seed(3))[1] for _ in range(2)]
    assert torch.equal(draws[0], draws[1])


def test_group_scale_feature_reaches_its_own_head_only():
    policy = LRPolicy(3)
    with torch.no_grad():
        for lin in policy.action_distribution.linear:
            lin.weight[:, -1] = torch.arange(11.0)
    a, _, _ = policy(torch.tensor([[1.0, 0.1, 0.5, 0.0, 0.1, 1.0, 1.0, 1.0]]))
    b, _, _ = policy(torch.tensor([[1.0, 0.1, 0.5, 0.0, 0.1, 0.0, 1.0, 1.0]]))
    assert not torch.allclose(a[0], b[0])
    assert torch.allclose(a[1:], b[1:])


def test_batched_encoder_equals_nn_lstm():
    """The batched LSTM maths equals running each statistic's nn.LSTM (so official weights mean the same)."""
    policy = LRPolicy(2)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.normal_()
    stats = torch.tensor([2.0, 0.5, 0.3, -0.1, 0.2])
    hidden = torch.randn(5, 2, 20)
    enc, new_hidden = policy.net(stats, hidden)
    for i, module in enumerate(policy.net.state_encoder):
        out, (h, c) = module.rnn(stats[i].view(1, 1, 1), (hidden[i, 0].view(1, 1, 20), hidden[i, 1].view(1, 1, 20)))
        assert torch.allclose(enc[20 * i : 20 * (i + 1)], out.view(-1), atol=1e-6)
        assert torch.allclose(new_hidden[i, 0], h.view(-1), atol=1e-6)
        assert torch.allclose(new_hidden[i, 1], c.view(-1), atol=1e-6)
