"""The L2O policy (docs/l2o.md, "Faithful to the release"): per-statistic LSTM encoders and one categorical head
per layer group.

Module names are chosen so that ``state_dict()`` keys equal those of the released ASG policy files:
``net.state_encoder.{i}.rnn.*``, ``action_distribution.linear.{g}.*``, ``critic.fc.*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from asg.errors import WeightsError
from asg.io import atomic_write
from asg.models.base import read_weight_file
from asg.models.finite import check_finite
from asg.models.official import official_policy_state

NUM_STATS = 5  # task loss, KL, progress, last-weight mean, last-weight std
HIDDEN = 20
SCALES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))  # {0.0, 0.1, ..., 1.0}

Hidden = Tensor  # [NUM_STATS, 2, HIDDEN]: (h, c) of each statistic's LSTM


class _StatEncoder(nn.Module):
    """Holds the LSTM(1 -> 20) of one scalar statistic (orthogonal weights, zero biases); run by ``_Encoder``."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.rnn = nn.LSTM(1, hidden, num_layers=1)
        for name, p in self.rnn.named_parameters():
            if name.startswith("weight"):
                nn.init.orthogonal_(p)
            else:
                nn.init.zeros_(p)


class _Encoder(nn.Module):
    """One ``_StatEncoder`` per statistic; outputs concatenated to [NUM_STATS * H].

    ``forward`` runs all LSTM cells as one batched computation (same maths as ``nn.LSTM``, gate order i, f, g, o).
    """

    def __init__(self, num_stats: int = NUM_STATS, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.state_encoder = nn.ModuleList(_StatEncoder(hidden) for _ in range(num_stats))

    def forward(self, stats: Tensor, hidden: Hidden) -> tuple[Tensor, Hidden]:
        """stats [S], hidden [S, 2, H] -> (encoding [S * H], new hidden [S, 2, H])."""
        # nn.LSTM registers its parameters by name; torch types Module.__getattr__ as Tensor | Module
        rnns = [cast(_StatEncoder, enc).rnn for enc in self.state_encoder]
        w_ih = torch.stack([cast(Tensor, r.weight_ih_l0) for r in rnns])  # [S, 4H, 1]
        w_hh = torch.stack([cast(Tensor, r.weight_hh_l0) for r in rnns])  # [S, 4H, H]
        bias = torch.stack([cast(Tensor, r.bias_ih_l0) + cast(Tensor, r.bias_hh_l0) for r in rnns])  # [S, 4H]
        h, c = hidden[:, 0], hidden[:, 1]  # [S, H]
        gates = w_ih.squeeze(2) * stats.unsqueeze(1) + torch.bmm(w_hh, h.unsqueeze(2)).squeeze(2) + bias
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return h_new.reshape(-1), torch.stack([h_new, c_new], dim=1)


class _GroupHeads(nn.Module):
    """Per group g: Linear(enc + 1, |SCALES|) on [encoding, scale_g]; orthogonal gain 0.01, zero bias."""

    def __init__(self, num_groups: int, in_dim: int, num_actions: int) -> None:
        super().__init__()
        self.linear = nn.ModuleList(nn.Linear(in_dim, num_actions) for _ in range(num_groups))
        for lin in self.linears:
            nn.init.orthogonal_(lin.weight, gain=0.01)
            nn.init.zeros_(lin.bias)

    @property
    def linears(self) -> list[nn.Linear]:
        """The heads of ``linear``, typed (a ``ModuleList`` yields plain ``nn.Module``)."""
        return [cast(nn.Linear, lin) for lin in self.linear]

    def forward(self, feats: Tensor) -> Tensor:
        """feats: [G, in_dim] -> logits [G, num_actions]."""
        weight = torch.stack([lin.weight for lin in self.linears])  # [G, A, in_dim]
        bias = torch.stack([lin.bias for lin in self.linears])  # [G, A]
        return torch.einsum("gai,gi->ga", weight, feats) + bias


class _Critic(nn.Module):
    """Linear(G * (enc + 1), 1); kept for checkpoint compatibility (REINFORCE does not use it)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, 1)
        nn.init.orthogonal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: Tensor) -> Tensor:
        return self.fc(feats.reshape(-1))


class LRPolicy(nn.Module):
    """Maps an observation [1, NUM_STATS + G] to a categorical over ``SCALES`` for each of G groups."""

    scales: Tensor  # buffer [len(SCALES)]

    def __init__(self, num_groups: int, hidden: int = HIDDEN, num_stats: int = NUM_STATS) -> None:
        super().__init__()
        self.num_groups, self.hidden, self.num_stats = num_groups, hidden, num_stats
        self.register_buffer("scales", torch.tensor(SCALES), persistent=False)
        self.net = _Encoder(num_stats, hidden)
        feat = num_stats * hidden + 1
        self.action_distribution = _GroupHeads(num_groups, feat, len(SCALES))
        self.critic = _Critic(num_groups * feat)

    def initial_hidden(self) -> Hidden:
        """Zero LSTM state [NUM_STATS, 2, H]."""
        return torch.zeros(self.num_stats, 2, self.hidden, device=self.scales.device)

    def forward(self, obs: Tensor, hidden: Hidden | None = None) -> tuple[Tensor, Tensor, Hidden]:
        """obs [1, NUM_STATS + G] -> (logits [G, 11], value [1], new hidden [NUM_STATS, 2, H])."""
        obs = obs.reshape(-1).to(self.scales.device, torch.float32)
        if obs.numel() != self.num_stats + self.num_groups:
            raise ValueError(f"observation has {obs.numel()} values, expected {self.num_stats + self.num_groups}")
        if hidden is None:
            hidden = self.initial_hidden()
        enc, new_hidden = self.net(obs[: self.num_stats], hidden)
        group_scale = obs[self.num_stats :].unsqueeze(1)  # [G, 1]
        feats = torch.cat([enc.expand(self.num_groups, -1), group_scale], dim=1)  # [G, 101]
        return self.action_distribution(feats), self.critic(feats), new_hidden

    def act(
        self,
        obs: Tensor,
        hidden: Hidden | None = None,
        deterministic: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[list[float], Tensor, Tensor, Tensor, Hidden]:
        """Choose one scale per group.

        Returns (scales list[G], action indices Long[G], log-prob (sum over groups, scalar),
        entropy (mean over groups, scalar; ln 11 for a uniform policy), new hidden).
        """
        logits, _, new_hidden = self(obs, hidden)
        logp_all = torch.log_softmax(logits, dim=-1)  # [G, 11]
        if deterministic:
            actions = logits.argmax(dim=-1)
        else:
            probs = logp_all.detach().exp().cpu()
            actions = torch.multinomial(probs, 1, generator=generator).view(-1).to(logits.device)
        log_prob = logp_all.gather(1, actions.view(-1, 1)).sum()
        entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        scales = [SCALES[int(a)] for a in actions]
        return scales, actions, log_prob, entropy, new_hidden


def save_policy(policy: LRPolicy, path: str | Path) -> None:
    """Write the policy weights atomically as safetensors."""
    state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata={"num_groups": str(policy.num_groups)}))


def _read_state(path: Path) -> tuple[dict[str, Tensor], object]:
    """(state dict, the torch file's object or None for .safetensors). A torch file is read as the official ASG
    policy layout (``asg.models.official``): a plain state dict of the policy's names, perhaps under
    ``state_dict`` or with ``module.``."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), None
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"cannot read policy file {path}: {exc}") from None
    try:
        obj = read_weight_file(path)
    except WeightsError as exc:
        raise WeightsError(f"{exc} (a policy file must be a weights-only torch state dict or safetensors)") from None
    state = obj["state_dict"] if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return state, obj


def resolve_policy_path(path: str | Path) -> Path:
    """An existing file, or the name of a policy shipped in ``asg/resources/policies`` (e.g. ``digits_lite0``)."""
    path = Path(path)
    shipped = Path(__file__).parent.parent / "resources" / "policies" / f"{path.stem}.safetensors"
    return path if path.is_file() or not shipped.is_file() or path.parent != Path(".") else shipped


def load_policy(path: str | Path, num_groups: int | None) -> LRPolicy:
    """Load a policy (.safetensors, or a torch state dict such as the official release's ``policy_*.pth``, whose
    layout ``asg.models.official`` describes; for those, what was found is printed).

    ``num_groups=None`` takes the group count from the file. Raises WeightsError if the file is missing,
    unreadable, or built for another architecture or group count.
    """
    path = resolve_policy_path(path)
    if not path.is_file():
        raise WeightsError(f"policy file {path} does not exist (train one with `asg l2o train`)")
    state, official = _read_state(path)
    check_finite(state, f"policy file {path}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    parts = [k.split(".") for k in state if k.startswith("action_distribution.linear.")]
    found = sorted({int(p[2]) for p in parts if len(p) > 2 and p[2].isdigit()})
    found_groups = len(found)
    if num_groups is None:
        num_groups = found_groups
    if found_groups != num_groups or found != list(range(found_groups)):
        raise WeightsError(
            f"{path}: wrong number of layer groups: expected {num_groups} (the model's groups), "
            f"found {found_groups} action heads in the policy file (was it trained for another backbone?)"
        )
    if num_groups == 0:
        raise WeightsError(f"{path} has no action_distribution.linear.* tensors: not an LRPolicy state dict")
    policy = LRPolicy(num_groups)
    found_line = None
    if official is not None:
        state, found_line = official_policy_state(official, path, policy.state_dict())
    expected = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        unexpected = sorted(set(got) - set(expected))[:3]
        shapes = [
            f"{k}: expected {expected[k]}, found {got[k]}" for k in expected if k in got and expected[k] != got[k]
        ]
        raise WeightsError(
            f"{path} does not match the LRPolicy architecture: missing {missing}, unexpected {unexpected}, "
            f"shape mismatches {shapes[:3]}"
        )
    policy.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    if found_line is not None:
        print(f"l2o.policy: {found_line}")
    return policy
