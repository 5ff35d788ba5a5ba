"""Helpers for sharding evaluation loops across ``torch.distributed`` ranks (no-ops when single-process)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from .errors import ConfigError


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


@contextlib.contextmanager
def process_group_from_environment() -> Iterator[tuple[int, int]]:
    """Join the process group a launcher such as ``torchrun`` describes in the environment
    (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and leave it at the end; yields
    (rank, world size). Single-process runs, and processes already in a group, are left as they are.

    The backend is gloo: what zmask reduces across ranks are CPU tensors and Python objects
    (metric counts, per-image scores), whatever device the model runs on.
    """
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not an integer (set by torchrun; unset it for a single process)") from None
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield rank_and_world()
        return
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} asks for a distributed run, but this torch build has no torch.distributed")
    dist.init_process_group("gloo")
    try:
        yield rank_and_world()
    finally:
        dist.destroy_process_group()
