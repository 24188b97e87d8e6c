"""One optimizer step: learning rates, precision, the method's loss, backward, gradient all-reduce, guards, update.

``lr_g = base_lr_g * schedule(step) * scale_g`` for every layer group ``g`` (the scales are the controller's).
Every rank computes the same averaged loss and gradient norm, so the guards decide alike on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from asg.config import Config
from asg.engine.batches import StepBatch
from asg.engine.distributed import Dist, rank_seed
from asg.engine.gradient_sync import average_gradients, broadcast_module
from asg.engine.guards import LossGuard, diverged
from asg.engine.precision import MAX_OVERFLOW_STREAK, Precision
from asg.engine.teacher.source import TeacherSource
from asg.methods import Batch, Method, TargetBatch
from asg.models import ASGNetwork


@dataclass
class StepOutput:
    """What a step reports: rank-averaged scalars (``loss``, ``task_loss``, the method's terms, ``grad_norm``, and
    under fp16 ``loss_scale`` and ``skipped_step``)."""

    logs: dict[str, float]


class StepRunner:
    """Takes optimizer steps on ``model``; ``kept()`` says what a divergence leaves on disk (for its message)."""

    def __init__(
        self,
        cfg: Config,
        model: ASGNetwork,
        method: Method,
        optimizer: torch.optim.Optimizer,
        schedule: Callable[[int], float],
        precision: Precision,
        dist: Dist,
        device: torch.device,
        teacher: TeacherSource,
        loss_guard: LossGuard,
        has_share: Callable[[int], bool],
        kept: Callable[[], str],
    ) -> None:
        self.cfg, self.model, self.method, self.optimizer = cfg, model, method, optimizer
        self.schedule, self.precision, self.dist, self.device = schedule, precision, dist, device
        self.teacher, self.loss_guard, self.has_share, self.kept = teacher, loss_guard, has_share, kept
        self.trainable = [p for g in optimizer.param_groups for p in g["params"]]
        self.last_batch: Batch | None = None  # for the check of the weights before a checkpoint
        self.last_share = 0.0  # this rank's number of images in the last batch (the weight of its loss)

    def __call__(self, data: StepBatch, step: int, scales: list[float]) -> StepOutput:
        """Take step ``step + 1`` on ``data`` with layer-group ``scales``."""
        cfg = self.cfg
        mult = self.schedule(step)
        for group, scale in zip(self.optimizer.param_groups, scales):
            group["lr"] = group["base_lr"] * mult * scale
        self.model.train(cfg.optim.bn_mode == "train")  # "frozen": eval mode, ImageNet BN statistics kept
        self.method.begin_step(self.model, step)  # e.g. LP-FT freezes or unfreezes the backbone
        if self.dist.rank > 0:  # rank 0 keeps the run's RNG stream (checkpointed); the others draw other dropout
            torch.manual_seed(rank_seed(cfg.train.seed, step, self.dist.rank))
        batch = self._to_device(data)
        with self.precision.autocast():
            batch.teacher_logits = self.teacher.outputs(batch.x, batch.idx)
            lo = self.method.forward_loss(self.model, batch)
        self.last_batch, self.last_share = batch, float(len(batch.idx)) if self.has_share(step) else 0.0
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler  # fp16: loss scaling; otherwise every call below passes through
        scaler.scale(lo.loss).backward()
        # gradients, loss and logs averaged over the ranks in one all_reduce: every rank decides alike below
        values = average_gradients(self.dist, self.trainable, {"loss": lo.loss.detach(), **lo.logs}, self.last_share)
        loss_value = values.pop("loss")
        if self.loss_guard.exploded(loss_value):
            what = "non-finite loss"
            if math.isfinite(loss_value):
                what = f"exploding loss ({self.loss_guard.factor:g} x its scale {self.loss_guard.scale:.4g})"
            raise diverged(what, {"loss": loss_value, **values}, step + 1, self.kept())
        self.loss_guard.update(loss_value)
        scaler.unscale_(self.optimizer)  # the gradients are identical on every rank: so is the overflow decision
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
        grad_norm = float(nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if not math.isfinite(grad_norm):
            self._gradient_overflow(grad_norm, step)
        else:
            self.precision.overflow_streak = 0
        scaler.step(self.optimizer)  # fp16: skipped when the gradients overflowed
        scaler.update()
        if cfg.optim.bn_mode == "train":  # each rank normalised its own images: keep rank 0's running statistics
            broadcast_module(self.dist, self.model, buffers_only=True)
        self.method.after_step(self.model)
        logs = {**values, "loss": loss_value, "grad_norm": grad_norm if math.isfinite(grad_norm) else 0.0}
        if self.precision.scaling:
            logs["loss_scale"] = float(scaler.get_scale())
            logs["skipped_step"] = float(not math.isfinite(grad_norm))
        return StepOutput(logs)

    def _to_device(self, data: StepBatch) -> Batch:
        def move(x: torch.Tensor) -> torch.Tensor:
            x = x.to(self.device, non_blocking=True)
            return x.contiguous(memory_format=torch.channels_last) if self.cfg.model.channels_last else x

        target = None
        if data.target is not None:
            tx, pseudo, tidx = data.target
            target = TargetBatch(move(tx), pseudo.to(self.device, non_blocking=True), tidx)
        return Batch(move(data.x), data.y.to(self.device, non_blocking=True), data.idx, None, target)

    def _gradient_overflow(self, grad_norm: float, step: int) -> None:
        """A non-finite gradient norm: divergence in fp32/bf16; in fp16 a skipped step, unless it keeps happening."""
        if not self.precision.scaling:
            raise diverged("non-finite gradient norm", {"grad_norm": grad_norm}, step + 1, self.kept())
        self.precision.overflow_streak += 1
        if self.precision.overflow_streak >= MAX_OVERFLOW_STREAK:
            scale = float(self.precision.scaler.get_scale())
            raise diverged(
                f"fp16 gradients overflowed at {MAX_OVERFLOW_STREAK} steps in a row",
                {"grad_norm": grad_norm, "loss_scale": scale},
                step + 1,
                self.kept(),
                " (try train.precision=bf16 or fp32)",
            )

    def last_batch_loss(self) -> float | None:
        """The rank-averaged loss of the current weights on the last batch, in eval mode (None before a step)."""
        if self.last_batch is None:
            return None
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self.precision.autocast():
            lo = self.method.forward_loss(self.model, self.last_batch)
        self.model.train(was_training)
        return self.dist.weighted_mean({"loss": lo.loss}, self.last_share)["loss"]
