"""REINFORCE for the L2O policy (docs/l2o.md).

As released: returns ``R_t = r_t + gamma * R_{t+1}`` over a rollout, loss ``-mean(R * log pi)``,
``SGD(lr_meta, momentum=0.9)``, no baseline, no entropy bonus, no gradient clipping. Options added here:
a moving-average baseline, advantage normalisation by a moving standard deviation of the returns (rewards
such as a window's loss drop are ~1e-2, too small for plain REINFORCE to move the policy), and an entropy
bonus. The rollout is bootstrapped with 0 (the critic is unused).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def discounted_returns(rewards: list[float], gamma: float) -> Tensor:
    """rewards [T] -> returns [T], ``R_t = r_t + gamma * R_{t+1}``, ``R_T = 0``."""
    out, running = [], 0.0
    for r in reversed(rewards):
        running = r + gamma * running
        out.append(running)
    return torch.tensor(out[::-1], dtype=torch.float32)


class Reinforce:
    """Collects (log pi(a|s), entropy, reward) per decision and updates the policy every ``num_steps``."""

    def __init__(
        self,
        policy: nn.Module,
        lr_meta: float = 7e-4,
        gamma: float = 0.0,
        num_steps: int = 5,
        entropy_coef: float = 0.0,
        baseline: bool = False,
        baseline_momentum: float = 0.9,
        normalize: bool = False,
    ) -> None:
        self.policy = policy
        self.gamma, self.num_steps, self.entropy_coef = gamma, num_steps, entropy_coef
        self.use_baseline, self.baseline_momentum = baseline, baseline_momentum
        self.baseline: float | None = None
        self.normalize = normalize
        self.return_var: float | None = None
        self.optimizer = torch.optim.SGD(policy.parameters(), lr=lr_meta, momentum=0.9)
        self.updates = 0
        self.log_probs: list[Tensor] = []
        self.entropies: list[Tensor] = []
        self.rewards: list[float] = []

    def add(self, log_prob: Tensor, entropy: Tensor, reward: float) -> None:
        """Record one decision: log_prob and entropy are scalar tensors with grad; reward a float."""
        self.log_probs.append(log_prob)
        self.entropies.append(entropy)
        self.rewards.append(float(reward))

    def clear(self) -> None:
        """Drop the pending rollout (e.g. after the task training diverged)."""
        self.log_probs, self.entropies, self.rewards = [], [], []

    def ready(self) -> bool:
        return len(self.rewards) >= self.num_steps

    def update(self) -> dict[str, float] | None:
        """One policy-gradient step on the stored rollout (any length >= 1); clears it. None if empty."""
        if not self.rewards:
            return None
        returns = discounted_returns(self.rewards, self.gamma)
        b = 0.0
        if self.use_baseline:
            if self.baseline is None:
                self.baseline = float(returns.mean())
            b = self.baseline
            m = self.baseline_momentum
            self.baseline = m * self.baseline + (1 - m) * float(returns.mean())
        log_probs = torch.stack(self.log_probs)
        entropy = torch.stack(self.entropies).mean()
        advantages = returns - b
        if self.normalize:
            var = float(((returns - float(returns.mean())) ** 2).mean()) + float((returns.mean() - b) ** 2)
            m = self.baseline_momentum
            self.return_var = var if self.return_var is None else m * self.return_var + (1 - m) * var
            advantages = advantages / (self.return_var**0.5 + 1e-8)
        advantages = advantages.to(log_probs.device)
        loss = -(advantages * log_probs).mean() - self.entropy_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        info = {
            "loss": float(loss.detach()),
            "mean_reward": sum(self.rewards) / len(self.rewards),
            "mean_return": float(returns.mean()),
            "baseline": b,
            "entropy": float(entropy.detach()),
        }
        self.clear()
        return info

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, baseline and update count (a pending rollout is not saved: resume is per episode)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
            "updates": self.updates,
            "return_var": self.return_var,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]
        self.updates = int(state["updates"])
        self.return_var = state.get("return_var")
