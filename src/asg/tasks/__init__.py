"""What differs between the tasks, one module each (``classification``, ``segmentation``): metrics and their labels,
how an evaluation batch is scored, the protocol fields, the loss, the model settings that init compatibility
compares, what pseudo-labels label. A third task is one new module with a :class:`Task`, added to ``TASKS``.

``task_of(data)`` gives the ``Task`` of a ``DataBundle`` (its ``task`` names it). Code outside models and data asks
the task instead of branching on its name; the engine, the reports and the demo sit above this package.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from asg.config import Config
from asg.data import DataBundle
from asg.data.files import list_collate, same_size_groups
from asg.errors import AsgError
from asg.tasks.base import Task
from asg.tasks.classification import CLASSIFICATION
from asg.tasks.segmentation import SEGMENTATION

TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, SEGMENTATION)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise AsgError(f"unknown task {name!r}: one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of(data: DataBundle) -> Task:
    return get_task(data.task)


def task_with_metric(metric: str) -> Task:
    """The task whose primary metric is ``metric`` (as result files name it)."""
    return next(t for t in TASKS.values() if t.primary_metric == metric)


@torch.no_grad()
def heldout_loss(model: nn.Module, data: DataBundle, cfg: Config, device: torch.device, max_batches: int = 4) -> float:
    """Mean task loss of ``model`` on the first ``max_batches`` batches of the held-out synthetic split."""
    name = data.source_val_name
    if name is None:
        raise AsgError("a held-out reward needs a source-val split (data.source_val_fraction > 0)")
    task, ds = task_of(data), data.eval_sets[name]
    loader: DataLoader[Dataset] = DataLoader(
        ds, batch_size=cfg.data.eval_batch_size, shuffle=False, collate_fn=list_collate
    )
    was_training, total, n = model.training, 0.0, 0
    model.eval()
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        for group in same_size_groups(batch):
            by_label: dict[tuple[int, ...], list[Any]] = {}  # native label sizes may differ under eval_resize
            for item in group:
                by_label.setdefault(tuple(torch.as_tensor(item[1]).shape), []).append(item)
            for items in by_label.values():
                x = torch.stack([item[0] for item in items]).to(device)
                y = torch.stack([torch.as_tensor(item[1]) for item in items]).to(device)
                total += float(task.loss(model(x).logits, y)) * len(items)
                n += len(items)
    model.train(was_training)
    return total / max(n, 1)
