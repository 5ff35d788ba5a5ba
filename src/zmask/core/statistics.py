"""Channel-wise clean statistics (mu, sigma) of resized activations, accumulated in float64."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from ..errors import InputError

Estimator = Literal["reference", "pooled"]


#: The sigma a fit stores for a channel that is constant on the clean data (a "dead" channel). Far
#: below float32's resolution of ``eps``, it leaves every Z-score as it was (``max(sigma, std_floor)
#: + eps`` rounds to the same value), and it lets a profile's loader refuse any sigma that is zero,
#: negative or subnormal: no fit writes one.
MIN_STD = 1e-20


def resize_nearest(activation: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """R(.): legacy nearest resize of a B x C x h x w activation to the heatmap size, as float32."""
    activation = activation.float()
    if tuple(activation.shape[-2:]) == tuple(size):
        return activation
    return F.interpolate(activation, size=size, mode="nearest")


def zscore(values: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Eq. 2's spatial Z-score ``(values - mu) * scale`` with ``scale = 1 / (max(sigma, floor) + eps)``.

    ``mean`` and ``scale`` come from :meth:`LayerStatistics.normaliser`. ``inplace`` overwrites
    ``values`` (a scratch tensor that no gradient flows through) instead of allocating.
    """
    if inplace and not values.requires_grad:
        return values.sub_(mean).mul_(scale)
    return (values - mean) * scale


def flush_subnormals(values: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``values`` with every subnormal (nonzero, below the dtype's smallest normal) set to zero.

    CPU arithmetic on subnormal floats is many times slower, and ReLU/PReLU layers produce them
    (9% of ESPNet's b3 outputs): a matrix product over such a map took twice as long. They lie 38
    orders of magnitude below any heatmap value, so setting them to zero changes no result
    (the heatmaps stay bit for bit the same in the benchmarks).
    """
    small = values.abs() < torch.finfo(values.dtype).tiny
    if not values.requires_grad:
        return values.masked_fill_(small, 0.0) if inplace else values.masked_fill(small, 0.0)
    return values.masked_fill(small & (values != 0), 0.0)  # exact zeros keep their gradient


def zscore_grid(activation: torch.Tensor, stats: LayerStatistics, heatmap_size: tuple[int, int], eps: float, std_floor: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Z-score of an activation resized (nearest) to the heatmap grid: B x C x H_R x W_R in ``dtype``
    (at least float32; float64 for the exact oracle)."""
    mean, scale = stats.normaliser(heatmap_size, eps, std_floor)
    dtype = torch.promote_types(activation.dtype, dtype)
    grid = F.interpolate(activation.to(dtype), size=heatmap_size, mode="nearest")
    return zscore(grid, mean.to(grid), scale.to(grid))


def split_planes(grid: torch.Tensor, planes: int) -> torch.Tensor:
    """B x C x H x W -> B x C x P x (H*W/P): row-major contiguous chunks of the flattened map."""
    batch, channels = grid.shape[:2]
    return grid.reshape(batch, channels, planes, -1)


@dataclass
class LayerStatistics:
    """Clean statistics of one layer: ``mean`` and ``std`` of shape C x P (float32)."""

    mean: torch.Tensor
    std: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def planes(self) -> int:
        return int(self.mean.shape[1])

    def normaliser(self, heatmap_size: tuple[int, int], eps: float, std_floor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, 1 / (max(sigma, floor) + eps)) broadcastable to C x H_R x W_R.

        With one plane both are C x 1 x 1, so they also apply at any spatial resolution.
        """
        scale = 1.0 / (self.std.clamp(min=std_floor) + eps)
        if self.planes == 1:
            return self.mean.view(-1, 1, 1), scale.view(-1, 1, 1)
        height, width = heatmap_size
        plane_size = height * width // self.planes
        expand = lambda t: t.repeat_interleave(plane_size, dim=1).view(-1, height, width)  # noqa: E731
        return expand(self.mean), expand(scale)

    def to(self, device: torch.device | str) -> LayerStatistics:
        return LayerStatistics(self.mean.to(device), self.std.to(device))


@dataclass
class StatisticsAccumulator:
    """Streaming accumulator of per-layer clean statistics.

    ``reference`` estimator (the authors' code): the mean over images of each image's spatial mean
    and unbiased spatial standard deviation. ``pooled``: the mean and unbiased standard deviation
    over all pixels of all images (between-image variance included), merged with Chan's formula.
    Accumulators can be merged, which is how ranks of a distributed run combine their shards.
    """

    heatmap_size: tuple[int, int]
    planes: int = 1
    estimator: Estimator = "reference"
    images: int = 0
    _sums: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.estimator not in ("reference", "pooled"):
            raise InputError(f"estimator={self.estimator!r} must be 'reference' or 'pooled'")

    def update(self, activations: dict[str, torch.Tensor]) -> None:
        """Add one batch of activations (name -> B x C x h x w)."""
        batch = None
        for name, activation in activations.items():
            if activation.dim() != 4:
                raise InputError(f"layer {name!r} gave a {activation.dim()}-D output; statistics need B x C x H x W maps")
            batch = activation.shape[0] if batch is None else batch
            with torch.no_grad():
                chunks = split_planes(resize_nearest(activation.detach(), self.heatmap_size), self.planes).double()
                if self.estimator == "reference":
                    values = [chunks.mean(-1).sum(0), chunks.std(-1, unbiased=True).sum(0)]
                else:
                    count = torch.full_like(chunks[0, ..., 0], chunks.shape[0] * chunks.shape[-1])
                    mean = chunks.mean(dim=(0, -1))
                    m2 = ((chunks - mean[None, ..., None]) ** 2).sum(dim=(0, -1))
                    values = [count, mean, m2]
            previous = self._sums.get(name)
            if previous is not None and previous[0].shape != values[0].shape:
                raise InputError(f"layer {name!r} changed its channel count from {previous[0].shape[0]} to {values[0].shape[0]}")
            self._sums[name] = values if previous is None else self._combine(previous, values)
        self.images += int(batch or 0)

    def merge(self, other: StatisticsAccumulator) -> None:
        """Fold another accumulator (e.g. another rank's) into this one."""
        if (other.heatmap_size, other.planes, other.estimator) != (self.heatmap_size, self.planes, self.estimator):
            raise InputError("cannot merge accumulators with different heatmap size, planes or estimator")
        for name, values in other._sums.items():
            mine = self._sums.get(name)
            self._sums[name] = [v.clone() for v in values] if mine is None else self._combine(mine, values)
        self.images += other.images

    def all_reduce(self) -> None:
        """Merge the accumulators of all ``torch.distributed`` ranks into each (no-op when single-process)."""
        from ..distributed import all_gather_objects, rank_and_world

        rank, world = rank_and_world()
        if world == 1:
            return
        states = all_gather_objects([(rank, self.images, {k: [t.cpu() for t in v] for k, v in self._sums.items()})])
        merged = StatisticsAccumulator(self.heatmap_size, self.planes, self.estimator)
        for _, images, sums in sorted(states, key=lambda state: state[0]):
            other = StatisticsAccumulator(self.heatmap_size, self.planes, self.estimator, images, sums)
            merged.merge(other)
        self.images, self._sums = merged.images, merged._sums

    def compute(self) -> dict[str, LayerStatistics]:
        """Final statistics per layer; raises if nothing was accumulated."""
        if self.images == 0 or not self._sums:
            raise InputError("no clean images were seen: give fit_statistics at least one batch")
        result = {}
        for name, values in self._sums.items():
            if self.estimator == "reference":
                mean, std = values[0] / self.images, values[1] / self.images
            else:
                count, mean, m2 = values
                std = (m2 / (count - 1).clamp(min=1)).sqrt()
            result[name] = LayerStatistics(mean.float(), std.float().clamp(min=MIN_STD))
        return result

    def _combine(self, first: list[torch.Tensor], second: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.estimator == "reference":
            return [a + b for a, b in zip(first, second)]
        (na, ma, m2a), (nb, mb, m2b) = first, second
        total = na + nb
        delta = mb - ma
        return [total, ma + delta * nb / total, m2a + m2b + delta**2 * na * nb / total]
