"""Index geometry shared by the refinement: legacy nearest resizing and pooling windows.

Every spatial step between a layer's raw activation and its pooled heatmap is a selection or an
average along one axis at a time. This module describes those steps per axis, so that the
refinement evaluates each distinct output value once and never materialises intermediate maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from ..errors import ConfigError

Pooling = Literal["valid_stretch", "same"]


def legacy_nearest_indices(in_size: int, out_size: int) -> torch.Tensor:
    """Source index of every output position of ``F.interpolate(mode="nearest")`` along one axis.

    Computed by interpolating an index ramp, so the result matches PyTorch's own rounding
    (floor(dst * in / out) in float32) exactly on every version.
    """
    if in_size <= 0 or out_size <= 0:
        raise ConfigError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    ramp = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size)
    return F.interpolate(ramp, size=out_size, mode="nearest").view(out_size).long()


@dataclass(frozen=True)
class AxisWindows:
    """Averaging windows along one axis of the heatmap grid, deduplicated.

    Output position ``j`` of the pooled-and-resized map is the mean of grid positions
    ``[start[inverse[j]], end[inverse[j]])``; ``start``/``end`` hold each distinct window once,
    in increasing order.
    """

    start: torch.Tensor
    end: torch.Tensor
    inverse: torch.Tensor
    same_offsets: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # Read on every frame by the refinement: computed once here (the windows never change).
        count = int(self.start.numel())
        length = self.end - self.start
        steps = torch.arange(count, device=self.start.device) + self.start[0] if count else self.start
        uniform = count > 0 and bool((length == length[0]).all()) and bool((self.start == steps).all())
        object.__setattr__(self, "_count", count)
        object.__setattr__(self, "_uniform_length", int(length[0]) if uniform else None)

    @property
    def count(self) -> int:
        return self._count  # type: ignore[attr-defined]

    @property
    def length(self) -> torch.Tensor:
        return self.end - self.start

    def uniform_length(self) -> int | None:
        """The common window length when the windows are consecutive (start = first + i), else None.

        Consecutive equal-length windows are evaluated by slicing instead of gathering.
        """
        return self._uniform_length  # type: ignore[attr-defined]

    def to(self, device: torch.device | str) -> AxisWindows:
        return AxisWindows(self.start.to(device), self.end.to(device), self.inverse.to(device), self.same_offsets)


def axis_windows(size: int, kernel: int, pooling: Pooling) -> AxisWindows:
    """Windows of a stride-1 box filter of width ``kernel`` on an axis of ``size`` positions.

    ``valid_stretch`` (the authors' code): unpadded pooling gives ``size - kernel + 1`` values,
    stretched back to ``size`` with legacy nearest resizing. ``same``: each output is the mean of
    the in-bounds part of a window placed ``(kernel - 1) // 2`` before it (padding that does not
    count in the divisor).
    """
    if kernel < 1 or kernel > size:
        raise ConfigError(f"kernel {kernel} does not fit an axis of {size} positions")
    if pooling == "valid_stretch":
        pooled = size - kernel + 1
        starts = legacy_nearest_indices(pooled, size)
        ends = starts + kernel
    elif pooling == "same":
        positions = torch.arange(size)
        starts = (positions - (kernel - 1) // 2).clamp(min=0)
        ends = (positions + kernel // 2 + 1).clamp(max=size)
    else:
        raise ConfigError(f"unknown pooling geometry {pooling!r}; use 'valid_stretch' or 'same'")
    keys = starts * (size + 1) + ends
    unique_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    # "same" windows are every position's window clipped at the borders: (before, after) lets the
    # box filter read them by slicing a replicate-padded table instead of gathering.
    offsets = ((kernel - 1) // 2, kernel // 2) if pooling == "same" else None
    return AxisWindows(start=unique_keys // (size + 1), end=unique_keys % (size + 1), inverse=inverse, same_offsets=offsets)


def window_weights(windows: AxisWindows, source_index: torch.Tensor, source_size: int) -> torch.Tensor:
    """Matrix ``W`` (windows x source_size) such that ``W @ v`` averages the windows of ``v[source_index]``.

    ``source_index`` maps each grid position to a position of the native (un-resized) axis, so the
    matrix folds the nearest resize and the box average into one linear map on the native axis.
    """
    one_hot = F.one_hot(source_index, source_size).to(torch.float64)
    cumulative = torch.cat([one_hot.new_zeros(1, source_size), one_hot.cumsum(0)])
    counts = cumulative[windows.end] - cumulative[windows.start]
    return counts / windows.length.unsqueeze(1).to(torch.float64)


@dataclass(frozen=True)
class SeparableAxis:
    """Distinct rows of :func:`window_weights` and the map from grid position to row.

    When the native axis is coarser than the grid, neighbouring windows often cover the same native
    positions in the same proportions; evaluating each distinct weight row once saves that work.
    """

    weights: torch.Tensor
    inverse: torch.Tensor

    def to(self, device: torch.device | str) -> SeparableAxis:
        return SeparableAxis(self.weights.to(device), self.inverse.to(device))


def separable_axis(windows: AxisWindows, source_index: torch.Tensor, source_size: int) -> SeparableAxis:
    """Deduplicated weights (float32) of ``windows`` on a native axis of ``source_size``."""
    weights = window_weights(windows, source_index, source_size)
    unique, inverse = torch.unique(weights, dim=0, return_inverse=True)
    return SeparableAxis(unique.float(), inverse[windows.inverse])
