"""Distributed data parallel helpers for ``torchrun``: process group, device, sharded batches, reductions.

Rank ``r`` of ``world`` takes every ``world``-th sample of the epoch's permutation, so the union of the
ranks' ``i``-th batches is the ``i``-th batch of one process using ``batch_size * world``. On one process
every helper is a no-op.
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
           "resolve_device", "wrap_model"]  # fmt: skip


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


def resolve_device(device: str | None) -> torch.device:
    """``device`` if given, else ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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


def all_reduce_sum(values: list[float], ddp: Dist, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64)."""
    if not ddp.enabled:
        return list(values)
    totals = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(totals)
    return totals.tolist()


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
    multiple of ``world``).
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, ddp: Dist = Dist(), start: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.start = ddp.rank, ddp.world, start

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order = order[: len(order) - len(order) % self.world]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[list[int]]:
        indices = self._indices()
        for b in range(self.start, len(self)):
            yield indices[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        per_rank = (self.n - self.n % self.world) // self.world
        return math.ceil(per_rank / self.batch_size)
