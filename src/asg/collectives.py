"""The collectives a loss may call without holding the trainer's process group object.

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
