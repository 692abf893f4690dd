"""Distributed data parallel helpers for ``torchrun``: process group, device, sharded batches, reductions.

Rank ``r`` of ``world`` takes every ``world``-th sample of the epoch's permutation, so the union of the
ranks' ``i``-th batches is the ``i``-th batch of one process using ``batch_size * world``. A last batch of
one image is merged into the one before it (BatchNorm cannot train on one image). On one process every
helper is a no-op. :func:`resolve_device` is the one device rule of every ``dismax`` command.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = ["Dist", "EpochBatchSampler", "all_reduce_max", "all_reduce_sum", "barrier", "init_distributed",
           "is_main_process", "resolve_device", "wrap_model"]  # fmt: skip


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """Whether this process is rank 0 of its ``torchrun`` job (or runs alone): the one that writes and reports."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(device: str | None) -> torch.device:
    """``device`` if given, else ``cuda`` when CUDA is available, else the CPU; ``cuda`` without an index is
    ``cuda:<LOCAL_RANK>`` (each ``torchrun`` process its own GPU).

    :raises ConfigError: (naming ``--device``) for a device string torch does not know or that is not here.
    """
    from .config import ConfigError

    try:
        resolved = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except (RuntimeError, TypeError) as error:
        message = f"--device: {device!r} is not a torch device; expected cpu, cuda, cuda:1, mps, ..."
        raise ConfigError(message) from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here; pass --device cpu.")
        index = resolved.index if resolved.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device: cuda:{index} does not exist ({torch.cuda.device_count()} CUDA devices).")
        resolved = torch.device("cuda", index)
    return resolved


def init_distributed(device: torch.device) -> Dist:
    """Join the ``torchrun`` process group (nccl on CUDA, gloo on CPU) when ``WORLD_SIZE`` > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def wrap_model(model: nn.Module, ddp: Dist, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` under DDP, else ``model``."""
    if not ddp.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(values: torch.Tensor, ddp: Dist) -> list[float]:
    """Element-wise sum over the ranks of ``values`` (a 1-d float64 tensor on the rank's device), read once."""
    if ddp.enabled:
        values = values.clone()
        dist.all_reduce(values)
    return values.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest ``value`` over the ranks (call on every rank)."""
    flag = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag.item())


def barrier(ddp: Dist) -> None:
    if ddp.enabled:
        dist.barrier()


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of a permutation seeded by ``(seed, epoch)``, sharded by rank, starting at batch ``start``.

    Rank ``r`` of ``world`` takes positions ``r, r + world, ...`` of the permutation (truncated to a
    multiple of ``world``), in batches of ``batch_size``; when the last batch would hold one image it joins
    the batch before (``batch_size + 1`` images). Batch ``i`` depends only on ``(seed, epoch, i)``, so a run
    resumed at batch ``start`` continues exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, ddp: Dist = Dist(), start: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.start = ddp.rank, ddp.world, start

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order = order[: len(order) - len(order) % self.world]
        return order[self.rank :: self.world]

    @property
    def per_rank(self) -> int:
        """Images each rank trains on per epoch."""
        return (self.n - self.n % self.world) // self.world

    def __iter__(self) -> Iterator[list[int]]:
        indices, count = self._indices(), len(self)
        for b in range(self.start, count):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size if b + 1 < count else len(indices)]

    def __len__(self) -> int:
        per_rank = self.per_rank
        batches = math.ceil(per_rank / self.batch_size)
        return batches - 1 if batches > 1 and per_rank % self.batch_size == 1 else batches
