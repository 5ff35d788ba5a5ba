"""Helpers for sharding evaluation loops across ``torch.distributed`` ranks (no-ops when single-process)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(dataset: Dataset, rank: int | None = None, world: int | None = None) -> Dataset:
    """This rank's share of ``dataset`` (every world-th item, starting at rank)."""
    default_rank, default_world = rank_and_world()
    rank, world = default_rank if rank is None else rank, default_world if world is None else world
    if world == 1:
        return dataset
    return Subset(dataset, list(range(rank, len(dataset), world)))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks (in place, returned); unchanged when not distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a list of picklable Python objects across ranks (local list when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, items)
        return [item for part in gathered for item in part]
    return list(items)
