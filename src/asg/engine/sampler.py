"""Deterministic, resumable batch order: epoch ``e`` is a permutation seeded by ``(seed, e)``."""

from __future__ import annotations

import math
from collections.abc import Iterator

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
    batches an uninterrupted one would.
    """

    def __init__(
        self, num_items: int, batch_size: int, seed: int, start_step: int = 0, total_steps: int = 0, min_batch: int = 1
    ):
        self.n, self.bs, self.seed = num_items, batch_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.steps_per_epoch = steps_per_epoch(num_items, batch_size, min_batch)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while step < self.total_steps:
            epoch, k = divmod(step, self.steps_per_epoch)
            order = self.epoch_order(epoch)
            for j in range(k, self.steps_per_epoch):
                if step >= self.total_steps:
                    return
                yield order[j * self.bs : (j + 1) * self.bs].tolist()
                step += 1

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)


class IndexedDataset(Dataset):
    """Wraps a dataset to also return the sample index: ``(image, label, index)``, or None for a skipped image."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        item = self.base[i]
        return None if item is None else (*item, i)
