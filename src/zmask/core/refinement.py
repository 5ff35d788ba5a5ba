"""Spatial Pooling Refinement (SPR): from a layer's activation to its single-channel heatmap.

``LayerRefiner`` is the fast implementation used everywhere; :func:`layer_heatmap_direct` follows
the specification literally (resize every channel, pool, resize back) and serves as the oracle
that tests and benchmarks compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Kernel, ZMaskConfig
from .boxfilter import box_mean_from_table, box_mean_separable, summed_area_table
from .geometry import AxisWindows, axis_windows, legacy_nearest_indices, window_weights
from .statistics import LayerStatistics

# How many elementwise operations one multiply-add of a CPU/GPU matrix product is worth; used by
# the "auto" box method to compare the two evaluators. Measured by benchmarks/bench_refinement.py.
_MATMUL_ADVANTAGE = 8.0


@dataclass(frozen=True)
class KernelPlan:
    """The distinct windows of one kernel on the heatmap grid, and (separable) their weights."""

    kernel: Kernel
    rows: AxisWindows
    cols: AxisWindows
    row_weights: torch.Tensor | None = None
    col_weights: torch.Tensor | None = None


@dataclass(frozen=True)
class LayerPlan:
    """Everything about one layer's refinement that depends only on shapes, computed once."""

    native_size: tuple[int, int]
    row_index: torch.Tensor
    col_index: torch.Tensor
    method: str
    kernels: dict[Kernel, KernelPlan]


def build_plan(native_size: tuple[int, int], config: ZMaskConfig, kernels: Sequence[Kernel], device: torch.device) -> LayerPlan:
    """Plan the refinement of a layer of spatial size ``native_size`` for ``kernels``."""
    height, width = config.heatmap_size
    row_index = legacy_nearest_indices(native_size[0], height)
    col_index = legacy_nearest_indices(native_size[1], width)
    windows = {k: (axis_windows(height, k[0], config.pooling), axis_windows(width, k[1], config.pooling)) for k in kernels}
    method = config.box_method
    if method == "auto":
        method = _cheaper_method(native_size, (height, width), windows.values())
    if method == "separable" and config.planes != 1:
        method = "table"  # per-plane statistics vary inside a native pixel's footprint
    plans = {}
    for kernel, (rows, cols) in windows.items():
        row_w = col_w = None
        if method == "separable":
            row_w = window_weights(rows, row_index, native_size[0]).float().to(device)
            col_w = window_weights(cols, col_index, native_size[1]).float().to(device)
        plans[kernel] = KernelPlan(kernel, _to(rows, device), _to(cols, device), row_w, col_w)
    return LayerPlan(native_size, row_index.to(device), col_index.to(device), method, plans)


def _cheaper_method(native: tuple[int, int], grid: tuple[int, int], windows) -> str:
    h, w = native
    table_cost = grid[0] * grid[1] * 6.0
    separable_cost = 0.0
    for rows, cols in windows:
        table_cost += rows.count * (grid[1] + 1) * 2 + rows.count * cols.count * 4
        nr, nc = rows.count, cols.count
        separable_cost += min(nr * h * w + nr * w * nc, h * w * nc + nr * h * nc) / _MATMUL_ADVANTAGE
    return "separable" if separable_cost < table_cost else "table"


def _to(windows: AxisWindows, device: torch.device) -> AxisWindows:
    return AxisWindows(windows.start.to(device), windows.end.to(device), windows.inverse.to(device))


def _expand(compact: torch.Tensor, plan: KernelPlan) -> torch.Tensor:
    return compact.index_select(-2, plan.rows.inverse).index_select(-1, plan.cols.inverse)


class LayerRefiner:
    """Computes SPR heatmaps of layers, caching shape-dependent plans per (layer, size, device).

    The work is done in chunks of ``config.channel_chunk`` channels, so the memory used grows with
    the chunk and the heatmap size, not with the layer's channel count.
    """

    def __init__(self, config: ZMaskConfig) -> None:
        self.config = config
        self._plans: dict[tuple, LayerPlan] = {}

    def plan(self, native_size: tuple[int, int], kernels: Sequence[Kernel], device: torch.device) -> LayerPlan:
        key = (native_size, tuple(kernels), str(device))
        if key not in self._plans:
            self._plans[key] = build_plan(native_size, self.config, kernels, device)
        return self._plans[key]

    def heatmaps(
        self, activation: torch.Tensor, stats: LayerStatistics, kernel_sets: dict[str, Sequence[Kernel]]
    ) -> dict[str, torch.Tensor]:
        """SPR heatmap (B x 1 x H_R x W_R) of one layer for each named kernel list.

        Pooled maps are shared between lists: a layer in both S and D pools each distinct kernel once.
        """
        config = self.config
        union = list(dict.fromkeys(k for kernels in kernel_sets.values() for k in kernels))
        plan = self.plan(tuple(activation.shape[-2:]), union, activation.device)
        mean, scale = stats.normaliser(config.heatmap_size, config.eps, config.std_floor)
        mean, scale = mean.to(activation.device), scale.to(activation.device)
        channels = activation.shape[1]
        reference = config.spr_variant == "reference"
        # reference: sum over channels of |pooled| per kernel (compact grid);
        # paper: per list, sum over channels of |prod of pooled| and max of the product before the last.
        abs_sums: dict[Kernel, torch.Tensor] = {}
        paper_sums: dict[str, torch.Tensor] = {}
        paper_norms: dict[str, torch.Tensor] = {}
        for start in range(0, channels, config.channel_chunk):
            part = slice(start, min(start + config.channel_chunk, channels))
            compact = self._pooled_chunk(activation[:, part].float(), mean, scale, part, plan)
            if reference:
                for kernel, values in compact.items():
                    total = values.abs().sum(1)
                    abs_sums[kernel] = total if kernel not in abs_sums else abs_sums[kernel] + total
                continue
            for name, kernels in kernel_sets.items():
                product = None
                for i, kernel in enumerate(kernels):
                    expanded = _expand(compact[kernel], plan.kernels[kernel])
                    product = expanded if product is None else product * expanded
                    if i == len(kernels) - 2:
                        peak = product.abs().flatten(1).amax(1)
                        paper_norms[name] = peak if name not in paper_norms else torch.maximum(paper_norms[name], peak)
                total = product.abs().sum(1)
                paper_sums[name] = total if name not in paper_sums else paper_sums[name] + total
        result = {}
        for name, kernels in kernel_sets.items():
            if reference:
                chain = None
                for kernel in kernels:
                    pooled = _expand(abs_sums[kernel] / channels, plan.kernels[kernel])
                    if chain is None:
                        chain = pooled
                    else:
                        peak = chain.flatten(1).amax(1).view(-1, 1, 1)
                        chain = pooled * chain / (1.0 + peak)
            else:
                # a_m = Q_m / ||Q_{m-1}||_inf, with Q_i the product of the first i pooled maps (see docs).
                chain = paper_sums[name] / channels
                if len(kernels) > 1:
                    chain = chain / paper_norms[name].clamp(min=torch.finfo(chain.dtype).tiny).view(-1, 1, 1)
            result[name] = chain.unsqueeze(1)
        return result

    def _pooled_chunk(self, chunk, mean, scale, part, plan: LayerPlan) -> dict[Kernel, torch.Tensor]:
        """Box means (B x c x rows x cols, compact) of the Z-score of a channel chunk, per kernel."""
        mean, scale = _slice_channels(mean, part), _slice_channels(scale, part)
        if plan.method == "separable":
            zscore = (chunk - mean) * scale
            return {k: box_mean_separable(zscore, p.row_weights, p.col_weights) for k, p in plan.kernels.items()}
        grid = chunk.index_select(-2, plan.row_index).index_select(-1, plan.col_index)
        table = summed_area_table((grid - mean) * scale)
        return {k: box_mean_from_table(table, p.rows, p.cols) for k, p in plan.kernels.items()}


def _slice_channels(values: torch.Tensor, part: slice) -> torch.Tensor:
    return values[part] if values.shape[0] > 1 else values


def zscore_direct(activation: torch.Tensor, stats: LayerStatistics, config: ZMaskConfig) -> torch.Tensor:
    """z = (R(h) - mu) / (max(sigma, floor) + eps) on the heatmap grid (B x C x H_R x W_R)."""
    mean, scale = stats.normaliser(config.heatmap_size, config.eps, config.std_floor)
    dtype = torch.promote_types(activation.dtype, torch.float32)  # float64 in, float64 out (exact oracle)
    grid = F.interpolate(activation.to(dtype), size=config.heatmap_size, mode="nearest")
    return (grid - mean.to(grid)) * scale.to(grid)


def avg_pool_direct(zscore: torch.Tensor, kernel: Kernel, pooling: str) -> torch.Tensor:
    """The pooling step of the specification with ``avg_pool2d``, back at the heatmap size."""
    size = tuple(zscore.shape[-2:])
    if pooling == "valid_stretch":
        pooled = F.avg_pool2d(zscore, kernel, stride=1)
        return F.interpolate(pooled, size=size, mode="nearest")
    kh, kw = kernel
    padding = ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2)
    total = F.avg_pool2d(F.pad(zscore, padding), kernel, stride=1)
    inside = F.avg_pool2d(F.pad(torch.ones_like(zscore[:1, :1]), padding), kernel, stride=1)
    return total / inside


def layer_heatmap_direct(activation: torch.Tensor, stats: LayerStatistics, kernels: Sequence[Kernel], config: ZMaskConfig) -> torch.Tensor:
    """SPR heatmap of one layer computed literally as the specification writes it (slow oracle)."""
    zscore = zscore_direct(activation, stats, config)
    if config.spr_variant == "reference":
        chain = None
        for kernel in kernels:
            pooled = avg_pool_direct(zscore, kernel, config.pooling).abs().mean(1, keepdim=True)
            if chain is None:
                chain = pooled
            else:
                chain = pooled * chain / (1.0 + chain.flatten(1).amax(1).view(-1, 1, 1, 1))
        return chain
    state = torch.ones_like(zscore)
    for kernel in kernels:
        norm = state.abs().flatten(1).amax(1).view(-1, 1, 1, 1)
        state = avg_pool_direct(zscore, kernel, config.pooling) * state / norm
    return state.abs().mean(1, keepdim=True)
