"""The batch stream: this rank's share of every global source batch and, in adaptation, of the target batch.

Batches are drawn per step from seeded samplers (``EpochBatchSampler``), so a run resumed at step ``t`` sees the
batches (and augmentations) it would have seen; each DataLoader has its own generator and leaves the global RNG
alone. Under ``torchrun`` each rank takes its part of every global batch (``ShardedBatchSampler``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from asg.config import Config
from asg.data import DataBundle, collate_skip_none
from asg.engine.distributed import Dist
from asg.engine.sampler import EpochBatchSampler, IndexedDataset, ShardedBatchSampler
from asg.engine.timing import PhaseTimer
from asg.errors import AsgError

TARGET_SEED_OFFSET = 7919  # the target set is drawn in another order than the source


def dataset_size(ds: Dataset) -> int:
    """``len(ds)``: every dataset here has one, though torch's ``Dataset`` type does not declare it."""
    return len(cast(Sized, ds))


@dataclass
class StepBatch:
    """One step's data on the host: source images ``x`` [B, 3, H, W], labels ``y`` ([B] or [B, H, W]), dataset
    indices ``idx`` [B]; ``target``: ``[x', pseudo-labels, idx']`` of the pseudo-labelled target set, or None."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    target: list[torch.Tensor] | None = None


class BatchStream:
    """Iterate the batches of steps ``start .. cfg.train.steps`` for this rank (``start`` given to ``begin``)."""

    def __init__(
        self, data: DataBundle, cfg: Config, dist: Dist, min_batch: int, target: Dataset | None = None
    ) -> None:
        self.data, self.cfg, self.dist, self.min_batch, self.target = data, cfg, dist, min_batch, target
        self.timer: PhaseTimer | None = None  # set by the trainer: the wait for a batch is the "data" phase
        self._source: Iterator[Any] | None = None
        self._targets: Iterator[Any] | None = None
        self._sharded: ShardedBatchSampler | None = None
        self.step = 0  # steps whose batch was handed out

    def has_share(self, step: int) -> bool:
        """Does the global batch of ``step`` give this rank any image (its loss then weighs 0 in the average)?"""
        return self._sharded is None or self._sharded.has_share(step)

    def begin(self, step: int) -> None:
        """Open the loaders at ``step`` (0, or the restored step of a resume)."""
        cfg, seed = self.cfg, self.cfg.train.seed
        self.step = step
        if self.target is not None:
            with_seeds = self.data.has_augmentation or bool(getattr(self.target, "is_random", False))
            batch = cfg.adapt.target_batch_size or cfg.data.batch_size
            self._targets = self._loader(self.target, batch, seed + TARGET_SEED_OFFSET, step, with_seeds, False)
        # random crops/flips drawn per (step, slot): exact resume
        self._source = self._loader(self.data.train, cfg.data.batch_size, seed, step, self.data.has_augmentation, True)

    def _loader(
        self, ds: Dataset, batch_size: int, seed: int, step: int, with_seeds: bool, source: bool
    ) -> Iterator[Any]:
        sampler: Any = EpochBatchSampler(
            dataset_size(ds), batch_size, seed, step, self.cfg.train.steps, self.min_batch, with_seeds=with_seeds
        )
        if self.dist.world > 1:
            sampler = ShardedBatchSampler(sampler, self.dist.rank, self.dist.world)
            if source:
                self._sharded = sampler
        loader = DataLoader(
            IndexedDataset(ds),
            batch_sampler=sampler,
            num_workers=self.cfg.data.num_workers,
            collate_fn=collate_skip_none,
            generator=torch.Generator().manual_seed(seed),
        )
        return iter(loader)

    def __iter__(self) -> Iterator[StepBatch]:
        if self._source is None:
            raise RuntimeError("BatchStream.begin(step) opens the loaders before iterating")
        while True:
            with self.timer("data") if self.timer is not None else contextlib.nullcontext():
                batch: Any = next(self._source, _END)
                target = next(self._targets) if self._targets is not None and batch is not _END else None
            if batch is _END:
                return
            self.step += 1
            if batch is None:
                raise AsgError(f"every image in the batch of step {self.step} was unreadable (skipped_images.txt)")
            x, y, idx = batch
            yield StepBatch(x, y, idx, target)


_END = object()
