"""One run on several processes (``torchrun``): the process group and the few collectives the trainer needs.

``data.batch_size`` is the global batch: rank ``r`` of ``w`` takes the slots ``r::w`` of each global batch of
:class:`~asg.engine.sampler.EpochBatchSampler`, and each sample keeps the augmentation seed of its global slot,
so what the run sees does not depend on the number of processes (a checkpoint resumes on any number).

Why no ``DistributedDataParallel``: a method may run several forward passes per step (self-training runs a source
and a target pass, ``_check_before_save`` another), which DDP only allows with workarounds, and a wrapped model
would need an unwrap helper wherever layer groups, the frozen ImageNet head, ``last_layer_weight``, checkpoints
and the teacher are used. Instead, after ``loss.backward()`` each rank weights its gradients by its share of the
global batch and one coalesced ``all_reduce`` sums them (:func:`~asg.engine.gradient_sync.average_gradients`), so
every rank applies the same update and the parameters stay identical.

World 1 (no ``WORLD_SIZE``, or 1): every helper returns at once without touching its input, so a single-process
run is bit-identical to one without this module.

This module holds :class:`Dist` (joining the group, its collectives) and the seed of each rank; the collectives of
the training step are in :mod:`asg.engine.gradient_sync` and :class:`~asg.engine.sampler.ShardedBatchSampler` is
with the other samplers.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as td
from torch import Tensor

from asg.collectives import collective, weighted_all_reduce
from asg.errors import AsgError
from asg.utils import resolve_device

T = TypeVar("T")
_LAUNCH = "launch with torchrun, e.g. `torchrun --nproc-per-node 4 -m asg train --config RECIPE`"


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @classmethod
    def from_env(cls, device: str = "auto") -> Dist:
        """Read torchrun's WORLD_SIZE/RANK/LOCAL_RANK and join (or reuse) the process group.

        ``device`` is ``train.device``: a CUDA run uses NCCL when available, anything else Gloo.
        """
        env = os.environ
        world = _env_int("WORLD_SIZE", "1")
        if world <= 1:
            return cls()
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise AsgError(
                f"WORLD_SIZE={world} but {', '.join(missing)} {verb} not set: the torch.distributed "
                f"environment is incomplete; {_LAUNCH}"
            )
        if not td.is_available():
            raise AsgError(f"WORLD_SIZE={world} but this PyTorch build has no torch.distributed; run one process")
        local = _env_int("LOCAL_RANK")
        if td.is_initialized():
            if td.get_world_size() != world:
                raise AsgError(f"the process group has {td.get_world_size()} processes but WORLD_SIZE={world}")
            return cls(td.get_rank(), world, local, str(td.get_backend()))
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            if local >= torch.cuda.device_count():
                raise AsgError(
                    f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible: start "
                    "at most that many processes per node (torchrun --nproc-per-node)"
                )
            torch.cuda.set_device(local)
        backend = "nccl" if cuda and td.is_nccl_available() else "gloo" if td.is_gloo_available() else None
        if backend is None:
            raise AsgError(
                "torch.distributed has neither NCCL (CUDA runs) nor Gloo here: install a PyTorch build "
                "with one of them, or run one process"
            )
        try:
            td.init_process_group(backend)  # env:// rendezvous: torchrun's MASTER_ADDR/PORT, RANK, WORLD_SIZE
        except (RuntimeError, ValueError) as exc:
            raise AsgError(
                f"cannot join the process group ({backend}, {env['MASTER_ADDR']}:{env['MASTER_PORT']}, "
                f"rank {env['RANK']} of {world}): {exc}"
            ) from None
        atexit.register(_leave)
        return cls(td.get_rank(), world, local, backend)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes the run folder."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where collectives run: this rank's GPU with NCCL, the CPU with Gloo."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def device(self, name: str) -> torch.device:
        """The torch device of ``train.device`` for this rank: ``cuda:LOCAL_RANK`` for a CUDA run on several."""
        dev = resolve_device(name)
        return torch.device("cuda", self.local_rank) if self.world > 1 and dev.type == "cuda" else dev

    def barrier(self) -> None:
        if self.world > 1:
            with collective("barrier"):
                td.barrier()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.world == 1:
            return tensor
        work = tensor.to(self.comm_device)
        with collective("all_reduce"):
            td.all_reduce(work)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def broadcast(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Rank ``src``'s ``tensor`` on every rank, in place; returns it."""
        if self.world == 1:
            return tensor
        work = tensor.to(self.comm_device)
        with collective("broadcast"):
            td.broadcast(work, src)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def broadcast_object(self, obj: T | None, src: int = 0) -> T | None:
        """Rank ``src``'s picklable ``obj`` on every rank (the others pass anything, e.g. None)."""
        if self.world == 1:
            return obj
        box = [obj]
        with collective("broadcast_object_list"):
            td.broadcast_object_list(box, src)
        return box[0]

    def shard(self, n_items: int) -> range:
        """This rank's items ``rank::world`` of ``range(n_items)``."""
        return range(self.rank, n_items, self.world)

    def weighted_mean(self, values: dict[str, Tensor], weight: float) -> dict[str, float]:
        """Means of scalar ``values`` over the ranks, each rank weighted by ``weight`` (its share of the batch)."""
        if self.world == 1:
            return {k: float(v) for k, v in values.items()}
        return weighted_all_reduce(self.comm_device, [], values, weight)

    def together(self, fn: Callable[[], T] | None) -> T | None:
        """Run ``fn`` on this rank (None: nothing), then raise on every rank if it failed on any.

        The failing rank re-raises its error; the others raise an AsgError quoting it, instead of waiting
        forever in the next collective. World 1: just ``fn()``.
        """
        if self.world == 1:
            return fn() if fn is not None else None
        result, error = None, None
        try:
            result = fn() if fn is not None else None
        except Exception as exc:
            error = exc
        text = None if error is None else str(error) if isinstance(error, AsgError) else repr(error)
        messages: list[str | None] = [None] * self.world
        with collective("all_gather_object"):
            td.all_gather_object(messages, text)
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message is not None:
                raise AsgError(f"process {rank} of {self.world} stopped: {message}")
        return result


def _env_int(name: str, default: str = "") -> int:
    text = os.environ.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise AsgError(f"{name}={text!r} is not a number; {_LAUNCH}") from None


def _leave() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def rank_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global RNG of rank ``rank`` > 0 at ``step`` (dropout masks differ across ranks, and resume)."""
    return ((seed * 1_000_003 + step) * 65_537 + rank) % (2**63)
