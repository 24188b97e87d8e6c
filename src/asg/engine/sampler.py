"""Deterministic, resumable batch order and augmentation: epoch ``e`` is a permutation seeded by ``(seed, e)``;
with ``with_seeds`` each sample also carries a seed for its random transform, derived from ``(seed, step, slot)``.

Seeding each sample (rather than each worker) makes random crops, scales and flips a function of the global step
alone: a resumed run, or one with another ``num_workers``, draws exactly the augmentations an uninterrupted run
draws.

:class:`ShardedBatchSampler` gives each process of a run on several (:mod:`asg.engine.distributed`) its part of
each global batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


def steps_per_epoch(num_items: int, batch_size: int, min_batch: int = 1) -> int:
    """Batches per epoch; a last partial batch smaller than ``min_batch`` is dropped.

    ``min_batch=2`` when BatchNorm trains: a batch of one image cannot be normalised over the batch.
    """
    steps = math.ceil(num_items / batch_size)
    return steps - 1 if 0 < num_items % batch_size < min_batch and steps > 1 else steps


class EpochBatchSampler(Sampler[list[int]]):
    """Yields the index batches of global steps ``start_step, start_step+1, ...`` (last partial batch kept).

    Because each epoch's order depends only on the seed and the epoch number, a resumed run sees exactly the
    batches an uninterrupted one would. ``with_seeds``: batches are ``[(index, sample_seed), ...]`` for
    :class:`IndexedDataset`, ``sample_seed`` = :func:`sample_seed` ``(seed, step, slot)``.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        total_steps: int = 0,
        min_batch: int = 1,
        with_seeds: bool = False,
    ):
        self.n, self.bs, self.seed = num_items, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.steps_per_epoch = steps_per_epoch(num_items, batch_size, min_batch)
        self.with_seeds = with_seeds

    def epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[list[Any]]:
        step = self.start_step
        while step < self.total_steps:
            epoch, k = divmod(step, self.steps_per_epoch)
            order = self.epoch_order(epoch)
            for j in range(k, self.steps_per_epoch):
                if step >= self.total_steps:
                    return
                batch = order[j * self.bs : (j + 1) * self.bs].tolist()
                if self.with_seeds:
                    batch = [(i, sample_seed(self.seed, step, slot)) for slot, i in enumerate(batch)]
                yield batch
                step += 1

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)


def sample_seed(seed: int, step: int, slot: int) -> int:
    """Seed of the random transform of the ``slot``-th sample of global step ``step`` (0-based)."""
    return ((seed * 1_000_003 + step) * 4099 + slot) % (2**63)


class IndexedDataset(Dataset):
    """Wraps a dataset to also return the sample index: ``(image, target, index)``, or None for a skipped image.

    A key ``(index, sample_seed)`` runs the wrapped dataset's transform under ``torch.manual_seed(sample_seed)``
    inside a forked RNG (the caller's RNG state is left as it was); a plain ``index`` uses the ambient RNG.
    """

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            i, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                item = self.base[i]
        else:
            i, item = key, self.base[key]
        return None if item is None else (*item, i)


class ShardedBatchSampler(Sampler[list[Any]]):
    """This rank's part ``batch[rank::world]`` of each global batch of ``sampler``.

    A rank whose part of a (last, partial) batch is empty gets the batch's first item instead, so that it can run
    the step like the others; :meth:`has_share` tells the trainer to give it weight 0.
    """

    def __init__(self, sampler: EpochBatchSampler, rank: int, world: int) -> None:
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self) -> Iterator[list[Any]]:
        for batch in self.sampler:
            yield batch[self.rank :: self.world] or batch[:1]

    def __len__(self) -> int:
        return len(self.sampler)

    def has_share(self, step: int) -> bool:
        """Whether the global batch of ``step`` has an item for this rank."""
        s = self.sampler
        j = step % s.steps_per_epoch
        return self.rank < min(s.bs, s.n - j * s.bs)
