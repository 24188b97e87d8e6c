"""Meta-training of the L2O policy with REINFORCE.

RECONSTRUCTION: the ASG release has no meta-training loop (docs/l2o.md, "Reconstructed"). This follows the best guess:
an episode trains a fresh copy of the same ImageNet-initialised task model for ``l2o.episode_steps`` steps while
the policy chooses the layer-group scales; every finished window yields a reward (``l2o.reward``) and REINFORCE
updates the policy every ``l2o.num_steps`` decisions (and at the episode end). Only synthetic data is used:
the real test sets are dropped from the data bundle before any episode runs.

Run folder: ``config.yaml``, ``policies/episode_NNN.safetensors``, ``meta_state.pt`` (resume per episode),
``meta_history.jsonl``, ``tb/`` (TensorBoard), ``meta_rewards.png``, ``scale_schedule.png``, ``policy.safetensors``
(the final policy) and ``done``.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from asg.config import Config
from asg.data import build_data, check_bundle_files
from asg.engine.rundir.folder import RunDir, RunKind
from asg.engine.trainer import Trainer
from asg.errors import AsgError, TrainingDiverged
from asg.io import atomic_write, torch_load_problem
from asg.l2o.controllers import L2OController
from asg.l2o.plots import plot_meta_rewards, plot_scale_schedule
from asg.l2o.policy import LRPolicy, save_policy
from asg.l2o.reinforce import Reinforce
from asg.l2o.rewards import get_reward
from asg.models import build_model
from asg.tasks import task_of
from asg.utils import progress

STATE_FILE = "meta_state.pt"  # written after every finished episode: a resume continues after the last one
# a meta-training run resumes from its last finished episode; one stopped before that starts afresh
META_TRAINING = RunKind(
    noun="meta-training run",
    markers=(STATE_FILE,),
    missing="no episode finished in this folder",
    stopped_before="its first episode finished",
    leftovers=(
        "meta_history.jsonl",
        "skipped_images.txt",
        "policy.safetensors",
        "meta_rewards.png",
        "scale_schedule.png",
        "tb",
        "policies",
    ),
)

if TYPE_CHECKING:
    from asg.models import ASGNetwork


def synthetic_only(bundle: Any, keep_source_val: bool) -> Any:
    """The bundle without its real test sets (and without source-val unless a reward needs it)."""
    name = bundle.source_val_name
    if keep_source_val and name is None:
        raise AsgError("l2o.reward=neg_heldout_loss needs a source-val split (set data.source_val_fraction > 0)")
    eval_sets = {name: bundle.eval_sets[name]} if keep_source_val else {}
    return dataclasses.replace(bundle, eval_sets=eval_sets, source_val_name=name if keep_source_val else None)


def episode_config(cfg: Config, episode: int) -> Config:
    """``cfg`` for one episode: ``l2o.episode_steps`` steps, a per-episode data seed, no logging or bars."""
    ep = copy.deepcopy(cfg)
    ep.train.steps = cfg.l2o.episode_steps
    ep.train.seed = cfg.train.seed + episode
    ep.train.eval_every = cfg.l2o.episode_steps
    ep.train.checkpoint_every = cfg.l2o.episode_steps
    ep.train.progress = False
    return ep


def _episode_seed(cfg: Config, episode: int) -> int:
    return int(np.random.SeedSequence([cfg.l2o.seed, cfg.train.seed, episode]).generate_state(1)[0])


def _summarise(ctrl: L2OController, episode: int, info: dict[str, Any]) -> dict[str, Any]:
    decisions = ctrl.history[1:]
    rewards = [r["reward"] for r in ctrl.rewards]
    groups = ctrl.group_names
    row = {
        "episode": episode,
        "decisions": len(decisions),
        "mean_reward": float(np.mean(rewards)) if rewards else None,
        "rewards": rewards,
        "mean_entropy": float(np.mean([d["entropy"] for d in decisions])) if decisions else None,
        "mean_scale": {g: float(np.mean([d["scales"][i] for d in decisions])) for i, g in enumerate(groups)}
        if decisions
        else {},
        "policy_updates": len(ctrl.updates),
        "mean_update_loss": float(np.mean([u["loss"] for u in ctrl.updates])) if ctrl.updates else None,
        "last_window_task_loss": ctrl.last_window.task_loss if ctrl.last_window else None,
        "schedule": [[h["step"], h["scales"]] for h in ctrl.history],
        **info,
    }
    return row


def _log_tb(writer: Any, row: dict[str, Any]) -> None:
    ep = row["episode"]
    for key in ("mean_reward", "mean_entropy", "mean_update_loss", "last_window_task_loss", "source_val_score"):
        if row.get(key) is not None:
            writer.add_scalar(f"meta/{key}", row[key], ep)
    for group, value in row["mean_scale"].items():
        writer.add_scalar(f"meta/scale/{group}", value, ep)
    writer.flush()


def meta_train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    *,
    data: Any | None = None,
    model: ASGNetwork | None = None,
    quiet: bool = False,
) -> Path:
    """Meta-train an ``LRPolicy`` for ``cfg.l2o.episodes`` episodes; returns the path of ``policy.safetensors``.

    ``data`` (a ``DataBundle``) and ``model`` (the initial task model) default to ``build_data(cfg.data)`` and
    ``build_model(cfg.model, num_classes)``. ``resume`` continues after the last finished episode.
    """
    with RunDir(out_dir) as run_dir:  # one process per folder; the lock goes with the process
        return _meta_train(cfg, run_dir, resume, data, model, quiet)


def _meta_train(cfg: Config, run_dir: RunDir, resume: bool, data: Any, model: ASGNetwork | None, quiet: bool) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    out_dir = run_dir.path
    state_path, final_path = out_dir / STATE_FILE, out_dir / "policy.safetensors"
    removed = run_dir.begin(resume, META_TRAINING)
    if removed and not quiet:
        print(META_TRAINING.fresh_note(out_dir, removed), file=sys.stderr)
    reward_fn = get_reward(cfg.l2o.reward)

    if data is None:
        data = build_data(cfg.data)
    bundle = synthetic_only(data, keep_source_val=cfg.l2o.reward == "neg_heldout_loss")
    bundle, skipped = check_bundle_files(bundle, cfg.data.on_bad_image)  # once, not per episode
    if skipped:
        run_dir.write_text("skipped_images.txt", "".join(line + "\n" for line in skipped))
    if model is None:
        model = build_model(cfg.model, bundle.num_classes, task=bundle.task)
    base_model = model.cpu()
    group_names = [name for name, _ in base_model.layer_groups()]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.l2o.seed)
        policy = LRPolicy(len(group_names))
    lc = cfg.l2o
    learner = Reinforce(
        policy,
        lc.lr_meta,
        lc.gamma,
        lc.num_steps,
        lc.entropy_coef,
        lc.baseline,
        lc.baseline_momentum,
        normalize=lc.normalize_advantage,
    )
    history_path = out_dir / "meta_history.jsonl"
    start = 0
    if resume:
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise AsgError(f"cannot read {state_path}: {torch_load_problem(exc)}") from None
        policy.load_state_dict(state["policy"])
        learner.load_state_dict(state["learner"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["episode"])
        # drop rows of an episode that did not finish
        run_dir.truncate_rows(lambda r: r["episode"] <= start, history_path.name)
    else:
        run_dir.write_text(history_path.name, "")
        run_dir.write_config(cfg)
    writer = SummaryWriter(str(out_dir / "tb"), purge_step=start + 1 if resume else None)

    bar = progress(
        range(start, lc.episodes),
        desc="meta-train",
        enabled=cfg.train.progress and not quiet,
        initial=start,
        total=lc.episodes,
    )
    last_history: list[dict[str, Any]] = []
    for ep in bar:
        t0 = time.time()
        ctrl = L2OController(
            policy,
            lc,
            steps_per_epoch=lc.steps_per_epoch,
            seed=_episode_seed(cfg, ep),
            learner=learner,
            reward_fn=reward_fn,
            kl_weight=cfg.method.kl_weight,
        )
        info: dict[str, Any] = {"diverged": None}
        try:
            trainer = Trainer(
                episode_config(cfg, ep),
                out_dir=None,
                data=bundle,
                model=copy.deepcopy(base_model),
                controller=ctrl,
                quiet=True,
                check_files=False,
            )
            result = trainer.fit()
            learner.update()  # flush a partial rollout (normally done by the controller at the last step)
            if result.history and bundle.source_val_name in result.history[-1]["metrics"]:
                metric = task_of(bundle).primary_metric  # mean-class accuracy, or mIoU for segmentation
                info["source_val_score"] = result.history[-1]["metrics"][bundle.source_val_name][metric]
                info["source_val_metric"] = metric
        except TrainingDiverged as exc:
            learner.clear()  # the rollout of a diverged episode is dropped
            info["diverged"] = str(exc)
        info["elapsed_s"] = round(time.time() - t0, 2)
        row = _summarise(ctrl, ep + 1, info)
        last_history = ctrl.history
        save_policy(policy, out_dir / "policies" / f"episode_{ep + 1:03d}.safetensors")
        run_dir.append_row(row, history_path.name)
        _log_tb(writer, row)
        state = {
            "policy": policy.state_dict(),
            "learner": learner.state_dict(),
            "episode": ep + 1,
            "torch_rng": torch.get_rng_state(),
            "group_names": group_names,
        }
        atomic_write(state_path, lambda tmp, s=state: torch.save(s, tmp))
        if hasattr(bar, "set_postfix") and row["mean_reward"] is not None:
            bar.set_postfix(reward=f"{row['mean_reward']:.3f}")
    writer.close()

    save_policy(policy, final_path)
    rows = run_dir.read_rows(history_path.name)
    if rows:
        plot_meta_rewards(rows, out_dir / "meta_rewards.png")
    if last_history:
        plot_scale_schedule(last_history, group_names, out_dir / "scale_schedule.png")
    run_dir.finish()
    return final_path
