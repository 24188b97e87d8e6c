"""The training step's collectives, each one call: the weighted mean of the gradients and the logged values after
``loss.backward()`` (one coalesced ``all_reduce``, :func:`average_gradients`) and rank 0's parameters and buffers
on every rank (:func:`broadcast_module`). The leaf helpers (``collective``, ``global_mean``) are in
:mod:`asg.collectives`. World 1: the helpers return at once without touching their input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from asg.collectives import common_dtype, weighted_all_reduce

if TYPE_CHECKING:
    from asg.engine.distributed import Dist


def average_gradients(d: Dist, params: list[Tensor], values: dict[str, Tensor], weight: float) -> dict[str, float]:
    """Replace the gradients of ``params`` by their mean over the ranks, weighted by ``weight`` (this rank's
    number of images in the step; 0 for a rank without any), and return the same weighted means of the scalar
    ``values`` (loss and logs), all in one coalesced all_reduce. World 1: gradients untouched, floats returned."""
    if d.world == 1:
        return {k: float(v) for k, v in values.items()}
    return weighted_all_reduce(d.comm_device, params, values, weight)


def broadcast_module(d: Dist, module: nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's floating-point parameters (unless ``buffers_only``) and buffers on every rank, one broadcast."""
    if d.world == 1:
        return
    tensors = [] if buffers_only else [p.data for p in module.parameters()]
    tensors += [b for b in module.buffers() if b.is_floating_point()]
    if not tensors:
        return
    dtype = common_dtype(tensors)
    flat = d.broadcast(torch.cat([t.reshape(-1).to(d.comm_device, dtype) for t in tensors]))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
