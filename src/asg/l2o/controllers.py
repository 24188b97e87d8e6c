"""Learning-rate controllers (the ``LRController`` protocol of ``asg.engine.control``).

* ``RandomController``: a new random scale per group at every decision (the released ``RANDOM=True``);
* ``RandomInitController``: one random draw at start, kept all run (``RANDOM='init'``);
* ``L2OController``: the learned policy (docs/l2o.md, "Faithful to the release"), optionally meta-training it
  (``learner``).

Decisions happen at the window ends of ``asg.l2o.windows``; the first window runs at scale 1. Scales are drawn
from ``SCALES`` = {0, 0.1, ..., 1}. Each controller owns a ``torch.Generator``, so a seed fixes its choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from asg.config import Config, L2OConfig
from asg.engine.control import FixedController, LRController, StepStats
from asg.errors import ConfigError, WeightsError
from asg.l2o.observation import WindowAccumulator, WindowSummary
from asg.l2o.policy import SCALES, LRPolicy, load_policy
from asg.l2o.reinforce import Reinforce
from asg.l2o.rewards import RewardContext, RewardFn, get_reward
from asg.l2o.windows import WindowSchedule


def _random_scales(num_groups: int, gen: torch.Generator) -> list[float]:
    idx = torch.randint(0, len(SCALES), (num_groups,), generator=gen)
    return [SCALES[int(i)] for i in idx]


class _WindowedController:
    """Shared machinery: window schedule, statistics accumulator, history, RNG, state dict."""

    kind = "windowed"

    def __init__(self, window_rule: str, min_steps: int, steps_per_epoch: int | None, seed: int) -> None:
        self.window_rule, self.min_steps, self.steps_per_epoch = window_rule, min_steps, steps_per_epoch
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.group_names: list[str] = []
        self.total_steps = 0
        self.scales: list[float] = []
        self.history: list[dict[str, Any]] = []
        self.acc = WindowAccumulator()
        self.schedule: WindowSchedule | None = None
        self._restored = False

    # --- protocol -------------------------------------------------------------------------------------
    def start(self, group_names: list[str], total_steps: int) -> list[float]:
        """Scale 1 for every group during the first window. Keeps a state restored before ``start``."""
        if self._restored and list(group_names) == self.group_names and total_steps == self.total_steps:
            return list(self.scales)
        self._restored = False
        self.group_names, self.total_steps = list(group_names), total_steps
        self.schedule = WindowSchedule(self.window_rule, total_steps, self.steps_per_epoch, self.min_steps)
        self.acc.reset()
        self.scales = self._initial_scales()
        self.history = [{"step": 0, "scales": list(self.scales)}]
        return list(self.scales)

    def after_step(self, stats: StepStats) -> list[float] | None:
        if self.schedule is None:
            raise RuntimeError("controller.start() must be called before after_step()")
        if self.schedule.steps_per_epoch is None and stats.steps_per_epoch and self.schedule.start == 0:
            self.schedule.set_steps_per_epoch(stats.steps_per_epoch)
        self._restored = False
        self.acc.add(stats)
        if not self.schedule.is_end(stats.step):
            return None
        summary = self.acc.summary()
        self._window_finished(summary)
        if stats.step >= self.total_steps:  # the last window: no decision
            self.acc.reset()
            self._run_finished()
            return None
        scales = self._decide(summary)
        self.acc.reset()
        self.schedule.advance()
        self.scales = list(scales)
        self.history.append({"step": stats.step, "scales": list(scales), **self._decision_info()})
        return list(scales)

    # --- hooks ----------------------------------------------------------------------------------------
    def _initial_scales(self) -> list[float]:
        return [1.0] * len(self.group_names)

    def _decide(self, summary: WindowSummary) -> list[float]:
        raise NotImplementedError

    def _window_finished(self, summary: WindowSummary) -> None:
        pass

    def _run_finished(self) -> None:
        pass

    def _decision_info(self) -> dict[str, Any]:
        return {}

    # --- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        acc = self.acc
        return {
            "kind": self.kind,
            "group_names": list(self.group_names),
            "total_steps": self.total_steps,
            "scales": list(self.scales),
            "history": [dict(h) for h in self.history],
            "rng": self.generator.get_state(),
            "schedule": self.schedule.state_dict() if self.schedule else None,
            "acc": {
                "n": acc.n,
                "sum_loss": acc.sum_loss,
                "sum_kl": acc.sum_kl,
                "sum_progress": acc.sum_progress,
                "last": vars(acc.last).copy() if acc.last else None,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ConfigError(f"controller state is for {state.get('kind')!r}, this run uses {self.kind!r}")
        self.group_names, self.total_steps = list(state["group_names"]), int(state["total_steps"])
        self.scales = [float(s) for s in state["scales"]]
        self.history = [dict(h) for h in state["history"]]
        self.generator.set_state(state["rng"])
        if state["schedule"] is not None:
            self.schedule = WindowSchedule(self.window_rule, self.total_steps, self.steps_per_epoch, self.min_steps)
            self.schedule.load_state_dict(state["schedule"])
        a = state["acc"]
        self.acc.n, self.acc.sum_loss, self.acc.sum_kl = int(a["n"]), float(a["sum_loss"]), float(a["sum_kl"])
        self.acc.sum_progress = float(a["sum_progress"])
        self.acc.last = StepStats(**a["last"]) if a["last"] else None
        self._restored = True


class RandomController(_WindowedController):
    """A fresh uniform draw from ``SCALES`` per group at every decision."""

    kind = "random"

    def _decide(self, summary: WindowSummary) -> list[float]:
        return _random_scales(len(self.group_names), self.generator)


class RandomInitController(_WindowedController):
    """One uniform draw from ``SCALES`` per group at start, never changed."""

    kind = "random-init"

    def _initial_scales(self) -> list[float]:
        return _random_scales(len(self.group_names), self.generator)

    def after_step(self, stats: StepStats) -> list[float] | None:
        return None


class L2OController(_WindowedController):
    """Scales chosen by an ``LRPolicy``; with ``learner`` set it also meta-trains the policy (REINFORCE).

    In training mode each finished window's reward (``reward_fn``) is credited to the action that set its
    learning rates, and ``learner.update()`` runs every ``cfg.num_steps`` decisions and at the end of the run.
    The LSTM state is carried between decisions (detached) if ``cfg.carry_hidden``, else zero every time.
    """

    kind = "l2o"

    def __init__(
        self,
        policy: LRPolicy,
        cfg: L2OConfig,
        steps_per_epoch: int | None = None,
        seed: int | None = None,
        learner: Reinforce | None = None,
        reward_fn: RewardFn | None = None,
        kl_weight: float = 0.0,
    ) -> None:
        super().__init__(cfg.window_rule, cfg.min_steps, steps_per_epoch, cfg.seed if seed is None else seed)
        self.policy, self.cfg, self.learner = policy, cfg, learner
        self.reward_fn = reward_fn or get_reward(cfg.reward)
        self.kl_weight = kl_weight
        self.probe: Callable[[], float] | None = None
        self.hidden = policy.initial_hidden()
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (log_prob, entropy) awaiting reward
        self._previous: WindowSummary | None = None
        self._last_info: dict[str, Any] = {}
        self.rewards: list[dict[str, float]] = []  # {"step", "reward"} per rewarded decision (training mode)
        self.updates: list[dict[str, float]] = []  # REINFORCE update logs (training mode)

    @property
    def last_window(self) -> WindowSummary | None:
        """Summary of the most recently finished window."""
        return self._previous

    def bind_probe(self, fn: Callable[[], float]) -> None:
        """``fn()`` = mean task loss of the current model on source-val (for ``neg_heldout_loss``)."""
        self.probe = fn

    def start(self, group_names: list[str], total_steps: int) -> list[float]:
        if len(group_names) != self.policy.num_groups:
            raise WeightsError(
                f"the L2O policy has {self.policy.num_groups} layer-group heads, the model has "
                f"{len(group_names)} groups ({', '.join(group_names)})"
            )
        restoring = self._restored
        scales = super().start(group_names, total_steps)
        if not (restoring and self._restored):
            self.hidden = self.policy.initial_hidden()
            self._pending, self._previous = None, None
        return scales

    def _window_finished(self, summary: WindowSummary) -> None:
        if self.learner is not None and self._pending is not None:
            ctx = RewardContext(previous=self._previous, kl_weight=self.kl_weight, probe=self.probe)
            reward = float(self.reward_fn(summary, ctx))
            log_prob, entropy = self._pending
            self.learner.add(log_prob, entropy, reward)
            self.rewards.append({"step": summary.end_step, "reward": reward})
            self._pending = None
            if self.learner.ready():
                self._log_update(self.learner.update())
        self._previous = summary

    def _run_finished(self) -> None:
        if self.learner is not None:
            self._log_update(self.learner.update())

    def _log_update(self, info: dict[str, float] | None) -> None:
        if info is not None:
            self.updates.append({"step": self._previous.end_step if self._previous else 0, **info})

    def _decide(self, summary: WindowSummary) -> list[float]:
        obs = self.acc.observation(self.scales)
        hidden = self.hidden if self.cfg.carry_hidden else self.policy.initial_hidden()
        with torch.set_grad_enabled(self.learner is not None):
            scales, _, log_prob, entropy, new_hidden = self.policy.act(
                obs, hidden, deterministic=not self.cfg.sample_actions, generator=self.generator
            )
        self.hidden = new_hidden.detach() if self.cfg.carry_hidden else self.policy.initial_hidden()
        if self.learner is not None:
            self._pending = (log_prob, entropy)
        self._last_info = {"log_prob": float(log_prob.detach()), "entropy": float(entropy.detach())}
        return scales

    def _decision_info(self) -> dict[str, Any]:
        return dict(self._last_info)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["hidden"] = self.hidden.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.hidden = state["hidden"].to(self.hidden.device)


def controller_seed(cfg: Config) -> int:
    """Seed of a controller's generator: mixes ``l2o.seed`` and ``train.seed`` so every run seed differs."""
    return int(np.random.SeedSequence([cfg.l2o.seed, cfg.train.seed]).generate_state(1)[0])


def _fixed(cfg: Config, spe: int | None) -> LRController:
    return FixedController()


def _random(cfg: Config, spe: int | None) -> LRController:
    return RandomController(cfg.l2o.window_rule, cfg.l2o.min_steps, spe, controller_seed(cfg))


def _random_init(cfg: Config, spe: int | None) -> LRController:
    return RandomInitController(cfg.l2o.window_rule, cfg.l2o.min_steps, spe, controller_seed(cfg))


def _l2o(cfg: Config, spe: int | None) -> LRController:
    if not cfg.l2o.policy:
        raise ConfigError("l2o.controller=l2o needs l2o.policy=PATH (a policy from `asg l2o train`)")
    policy = load_policy(cfg.l2o.policy, None)  # group count checked against the model in start()
    policy.eval()
    return L2OController(policy, cfg.l2o, spe, seed=controller_seed(cfg))


CONTROLLERS: dict[str, Callable[[Config, int | None], LRController]] = {
    "fixed": _fixed,
    "random": _random,
    "random-init": _random_init,
    "l2o": _l2o,
}


def build_controller(cfg: Config, steps_per_epoch: int | None = None) -> LRController:
    """The controller named by ``l2o.controller``; ``l2o.steps_per_epoch`` overrides the data's epoch length."""
    if cfg.l2o.controller not in CONTROLLERS:
        raise ConfigError(f"l2o.controller: {cfg.l2o.controller!r} is not one of {', '.join(CONTROLLERS)}")
    spe = cfg.l2o.steps_per_epoch or steps_per_epoch
    return CONTROLLERS[cfg.l2o.controller](cfg, spe)
