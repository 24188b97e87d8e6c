"""The collectives a loss (and the engine's gradient averaging) may call without holding the trainer's process group
object.

A leaf module (it imports only :mod:`asg.errors`, which imports nothing), so that methods reach across ranks
without importing the engine. With no process group of several processes every helper returns its input.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
import torch.distributed as td
from torch import Tensor

from asg.errors import AsgError


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a process died, or the network between them broke) into one AsgError."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError and gloo/NCCL errors derive from RuntimeError
        rank, world = (td.get_rank(), td.get_world_size()) if td.is_initialized() else ("?", "?")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\] ", "", first).split(" This is typically")[0]  # gloo's C++ source
        raise AsgError(
            f"process {rank} of {world}: the {what} failed because another process of the run stopped or lost "
            f"contact ({first}); its own error, if any, is in its output. Only process 0 writes checkpoints, "
            "each with a rename, so the last one is complete: continue with --resume"
        ) from None


def common_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float32, or a wider floating type that one of ``tensors`` has (no precision lost in a flat buffer)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def weighted_all_reduce(
    dev: torch.device, params: list[Tensor], values: dict[str, Tensor], weight: float
) -> dict[str, float]:
    """One all_reduce of ``[weight * grads..., has_grad flags..., weight * values..., weight]``; sets each
    parameter's gradient to the weighted mean (None where no rank had one) and returns the values' means.
    ``dev``: the device the process group communicates on. Every rank must call it."""
    dtype = common_dtype(params)
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


def global_mean(value: Tensor, weight: float) -> Tensor:
    """``value`` (a scalar) averaged over the ranks of the initialised process group, weighted by ``weight``;
    ``value`` itself without a group of several processes (methods call this: they hold no ``Dist``)."""
    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return value
    backend = str(td.get_backend())
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    dtype = common_dtype([value])
    pair = torch.tensor([0.0, float(weight)], device=dev, dtype=dtype)
    pair[0] = value.detach().reshape(()).to(dev, dtype) * weight
    with collective("all_reduce"):
        td.all_reduce(pair)
    return (pair[0] / pair[1]).to(value.device)


def all_gather_rows(rows: Tensor) -> list[Tensor]:
    """Every rank's ``rows`` [n_r, ...] in rank order (n_r may differ between ranks; the trailing shape and dtype
    may not); ``[rows]`` without a process group of several processes (e.g. CSG's queue takes every rank's keys)."""
    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return [rows]
    backend = str(td.get_backend())
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    world = td.get_world_size()
    count = torch.tensor([len(rows)], device=dev, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    with collective("all_gather"):
        td.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = rows.new_zeros((max(sizes), *rows.shape[1:]), device=dev)
    padded[: len(rows)] = rows.detach().to(dev)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    with collective("all_gather"):
        td.all_gather(parts, padded)
    return [p[:n].to(rows.device) for p, n in zip(parts, sizes)]
