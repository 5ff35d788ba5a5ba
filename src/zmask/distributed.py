"""Helpers for sharding evaluation loops across ``torch.distributed`` ranks (no-ops when single-process)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from .data.batching import dataset_length
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
    return Subset(dataset, list(range(rank, dataset_length(dataset), world)))


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """torch's errors from a collective (a rank that stopped, a broken connection, a timeout) as one
    ``ConfigError`` naming this rank; the original is chained."""
    try:
        yield
    except dist.DistError as error:
        rank, world = rank_and_world()
        text = " ".join(str(error).split())[:300]
        raise ConfigError(f"rank {rank} of {world}: {what} across the ranks failed ({type(error).__name__}: {text}); "
                          "another rank probably stopped: see its own error") from error


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks (in place, returned); unchanged when not distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with _collective("summing results"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(items: list[Any]) -> list[Any]:
    """Concatenate a list of picklable Python objects across ranks (local list when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[Any]] = [[] for _ in range(dist.get_world_size())]
        with _collective("gathering results"):
            dist.all_gather_object(gathered, items)
        return [item for part in gathered for item in part]
    return list(items)


# How long a rank waits for the others to join the process group (seconds), unless ZMASK_DIST_TIMEOUT says.
DEFAULT_JOIN_TIMEOUT = 60.0
JOIN_TIMEOUT_VARIABLE = "ZMASK_DIST_TIMEOUT"
# How long a collective (gathering the per-image results) may wait for a slower rank, once all have joined.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
LAUNCH_HINT = "start every rank (torchrun --nproc-per-node N ...), or unset WORLD_SIZE for a single process"


def _environment_integer(name: str, low: int, high: int | None = None) -> int:
    """The integer in environment variable ``name``, in [low, high]; a ConfigError saying what is wrong otherwise."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} asks for a distributed run, but {name} is not set: {LAUNCH_HINT}")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer (set by torchrun; unset WORLD_SIZE for a single process)") from None
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name}={value} must be {bound}" + (f" (WORLD_SIZE={os.environ.get('WORLD_SIZE')})" if name == "RANK" else ""))
    return value


def join_timeout() -> float:
    """Seconds a rank waits for its peers to join: ``ZMASK_DIST_TIMEOUT`` (a positive number), or 60."""
    raw = os.environ.get(JOIN_TIMEOUT_VARIABLE)
    if raw is None or not raw.strip():
        return DEFAULT_JOIN_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 7 * 24 * 3600):
        raise ConfigError(f"{JOIN_TIMEOUT_VARIABLE}={raw!r} must be a number of seconds in (0, 604800]")
    return value


def distributed_environment() -> tuple[int, int, str, int] | None:
    """(rank, world size, master address, master port) of the run a launcher describes in the
    environment, or None for a single process (``WORLD_SIZE`` unset or 1). Checked before any
    connection: each variable must be set and in range, and ``RANK < WORLD_SIZE``."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not an integer (set by torchrun; unset it for a single process)") from None
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world} must be a positive integer (unset it for a single process)")
    if world == 1:
        return None
    rank = _environment_integer("RANK", 0, world - 1)
    address = os.environ.get("MASTER_ADDR", "").strip()
    if not address:
        raise ConfigError(f"WORLD_SIZE={world} asks for a distributed run, but MASTER_ADDR is not set: {LAUNCH_HINT}")
    port = _environment_integer("MASTER_PORT", 1, 65535)
    return rank, world, address, port


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Hold back what torch's C++ side writes to stderr (c10d logs every failed connection attempt
    with a stack of frames) while joining; it is written out again if the join succeeds."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding host): nothing to hold back
        yield
        return
    joined = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            joined = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if joined:
                held.seek(0)
                text = held.read().decode(errors="replace")
                if text:
                    sys.stderr.write(text)


@contextlib.contextmanager
def process_group_from_environment() -> Iterator[tuple[int, int]]:
    """Join the process group a launcher such as ``torchrun`` describes in the environment
    (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and leave it at the end; yields
    (rank, world size). Single-process runs, and processes already in a group, are left as they are.

    Joining waits at most ``ZMASK_DIST_TIMEOUT`` seconds (default 60) for the other ranks, then
    raises a ``ConfigError`` (a peer that never starts would otherwise wait for torch's 30 minutes);
    missing or inconsistent variables are a ``ConfigError`` at once, as is any error torch raises
    while joining. Once every rank has joined, collectives wait up to 30 minutes for a slower rank.

    The backend is gloo: what zmask reduces across ranks are CPU tensors and Python objects
    (metric counts, per-image scores), whatever device the model runs on.
    """
    if dist.is_available() and dist.is_initialized():
        yield rank_and_world()
        return
    environment = distributed_environment()
    if environment is None:
        yield rank_and_world()
        return
    rank, world, address, port = environment
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} asks for a distributed run, but this torch build has no torch.distributed")
    timeout = join_timeout()
    where = f"rank {rank} of {world} at MASTER_ADDR={address} MASTER_PORT={port}"
    try:
        with _quiet_native_stderr():
            store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
            store.set_timeout(COLLECTIVE_TIMEOUT)  # as torch sets it after its own rendezvous
    except (RuntimeError, ValueError, OSError, TimeoutError) as error:  # DistError is a RuntimeError
        text = " ".join(str(error).split())
        waited = "timed out" in text.lower() or isinstance(error, TimeoutError)
        reason = (f"the other ranks did not join within {timeout:g} s ({JOIN_TIMEOUT_VARIABLE} sets the wait)" if waited
                  else f"{type(error).__name__}: {text[:300]}")
        raise ConfigError(f"could not join the process group as {where}: {reason}; {LAUNCH_HINT}") from error
    try:
        yield rank_and_world()
    finally:
        dist.destroy_process_group()
