"""The training step's collectives, each one call: the weighted mean of the gradients and the logged values after
``loss.backward()`` (one coalesced ``all_reduce``, :func:`average_gradients`) and rank 0's parameters and buffers
on every rank (:func:`broadcast_module`). The leaf helpers (``collective``, ``global_mean``) are in
:mod:`asg.collectives`. World 1: the helpers return at once without touching their input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as td
from torch import Tensor, nn

from asg.collectives import collective
from asg.collectives import common_dtype as _common_dtype

if TYPE_CHECKING:
    from asg.engine.distributed import Dist


def _reduce(d: Dist, params: list[Tensor], values: dict[str, Tensor], weight: float) -> dict[str, float]:
    """One all_reduce of ``[weight * grads..., has_grad flags..., weight * values..., weight]``; sets each
    parameter's gradient to the weighted mean (None where no rank had one) and returns the values' means."""
    dev, dtype = d.comm_device, _common_dtype(params)
    grads = [p.grad for p in params]
    parts = [
        (g.detach().reshape(-1).to(dev, dtype) * weight)
        if g is not None
        else torch.zeros(p.numel(), device=dev, dtype=dtype)
        for p, g in zip(params, grads)
    ]
    flags = torch.tensor([float(g is not None) for g in grads], device=dev, dtype=dtype)
    scalars = [v.detach().to(dev, dtype).reshape(1) * weight for v in values.values()]
    buffer = torch.cat([*parts, flags, *scalars, torch.tensor([float(weight)], device=dev, dtype=dtype)])
    with collective("all_reduce of the gradients"):
        td.all_reduce(buffer)
    total, offset = buffer[-1], 0
    had_grad = buffer[sum(part.numel() for part in parts) :][: len(params)] > 0
    for p, part, had in zip(params, parts, had_grad.tolist()):
        if had:
            p.grad = (buffer[offset : offset + part.numel()] / total).view_as(p).to(p.device, p.dtype)
        offset += part.numel()
    start = offset + len(params)
    means = (buffer[start : start + len(values)] / total).tolist()
    return dict(zip(values, means))


def average_gradients(d: Dist, params: list[Tensor], values: dict[str, Tensor], weight: float) -> dict[str, float]:
    """Replace the gradients of ``params`` by their mean over the ranks, weighted by ``weight`` (this rank's
    number of images in the step; 0 for a rank without any), and return the same weighted means of the scalar
    ``values`` (loss and logs), all in one coalesced all_reduce. World 1: gradients untouched, floats returned."""
    if d.world == 1:
        return {k: float(v) for k, v in values.items()}
    return _reduce(d, params, values, weight)


def broadcast_module(d: Dist, module: nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's floating-point parameters (unless ``buffers_only``) and buffers on every rank, one broadcast."""
    if d.world == 1:
        return
    tensors = [] if buffers_only else [p.data for p in module.parameters()]
    tensors += [b for b in module.buffers() if b.is_floating_point()]
    if not tensors:
        return
    dtype = _common_dtype(tensors)
    flat = d.broadcast(torch.cat([t.reshape(-1).to(d.comm_device, dtype) for t in tensors]))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
