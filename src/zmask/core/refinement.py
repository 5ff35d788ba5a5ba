"""Spatial Pooling Refinement (SPR): from a layer's activation to its single-channel heatmap.

``LayerRefiner`` is the fast implementation used everywhere; :func:`layer_heatmap_direct` follows
the specification literally (resize every channel, pool, resize back) and serves as the oracle
that tests and benchmarks compare against.

How the fast path works: the pooled-and-stretched map of a kernel takes one value per distinct
(row window, column window) pair, so it is computed on that compact grid and expanded by index
only after the channel reduction. Each layer uses one of two exact evaluators, chosen per layer:

* ``table``: resize the Z-score to the heatmap grid (nearest), build one float64 summed-area table
  per channel chunk, and read every kernel's windows from it (cost independent of kernel size);
* ``separable``: apply per-axis weight matrices, which fold resize and window average together,
  directly to the native-resolution Z-score; cheap for deep layers far coarser than the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import Kernel, ZMaskConfig
from ..errors import ConfigError
from .boxfilter import Workspace, box_mean_separable, box_sum_from_table, separable_layout, summed_area_table, window_areas
from .geometry import AxisWindows, SeparableAxis, axis_windows, legacy_nearest_indices, separable_axis
from .statistics import LayerStatistics, flush_subnormals, zscore, zscore_grid

# How many multiply-adds of a matrix product cost as much as one elementwise operation of the
# table evaluator, for the "auto" choice between the evaluators. benchmarks/bench_box_method.py
# times both evaluators on every layer of the shipped presets and prints the range of values for
# which "auto" picks the faster one; at 1 thread (torch 2.14, this project's 2-core machine) that
# range was 13.6 to 14.9 over 17 layers, and 14.2 is its middle.
MATMUL_ADVANTAGE = 14.2


@dataclass(frozen=True)
class KernelPlan:
    """How to evaluate one kernel: grid windows (table) or deduplicated weights (separable)."""

    kernel: Kernel
    rows: AxisWindows
    cols: AxisWindows
    row_weights: SeparableAxis | None = None
    col_weights: SeparableAxis | None = None

    @property
    def row_inverse(self) -> torch.Tensor:
        return self.row_weights.inverse if self.row_weights is not None else self.rows.inverse

    @property
    def col_inverse(self) -> torch.Tensor:
        return self.col_weights.inverse if self.col_weights is not None else self.cols.inverse

    def expand(self, compact: torch.Tensor) -> torch.Tensor:
        """Compact values (... x rows x cols) -> the full H_R x W_R map."""
        return compact.index_select(-2, self.row_inverse).index_select(-1, self.col_inverse)

    def separable_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) weight matrices of the separable evaluator (a plan of a "separable" layer has them)."""
        assert self.row_weights is not None and self.col_weights is not None, "a kernel planned for the table evaluator"
        return self.row_weights.weights, self.col_weights.weights


@dataclass(frozen=True)
class LayerPlan:
    """Everything about one layer's refinement that depends only on shapes, computed once.

    ``resample``: per axis, how the nearest resize to the grid reads the native map when it is an
    integer pattern - ("up", f) repeats each native row f times, ("down", f) takes every f-th -
    or None when the resize must go through ``F.interpolate``.
    """

    native_size: tuple[int, int]
    method: str
    kernels: dict[Kernel, KernelPlan]
    resample: tuple[tuple[str, int], tuple[str, int]] | None = None


def integer_resample(index: torch.Tensor, native: int) -> tuple[str, int] | None:
    """("up", f) if the nearest indices are ``i // f``, ("down", f) if they are ``i * f``, else None."""
    size = index.numel()
    positions = torch.arange(size)
    if size % native == 0 and torch.equal(index, positions // (size // native)):
        return ("up", size // native)
    if native % size == 0 and torch.equal(index, positions * (native // size)):
        return ("down", native // size)
    return None


def build_plan(native_size: tuple[int, int], config: ZMaskConfig, kernels: Sequence[Kernel], device: torch.device) -> LayerPlan:
    """Plan the refinement of a layer of spatial size ``native_size`` for ``kernels``."""
    row_index, col_index, windows, separable = _geometry(native_size, config, kernels)
    method = config.box_method
    if method == "auto":
        method = evaluator_cost(native_size, config.heatmap_size, windows, separable).method()
    if method == "separable" and config.planes != 1:
        method = "table"  # per-plane statistics change inside one native pixel's footprint
    plans = {}
    for kernel, (rows, cols) in windows.items():
        row_w, col_w = separable[kernel] if method == "separable" else (None, None)
        plans[kernel] = KernelPlan(
            kernel, rows.to(device), cols.to(device),
            row_w.to(device) if row_w is not None else None, col_w.to(device) if col_w is not None else None,
        )
    row_resample, col_resample = integer_resample(row_index, native_size[0]), integer_resample(col_index, native_size[1])
    resample = (row_resample, col_resample) if row_resample is not None and col_resample is not None else None
    return LayerPlan(native_size, method, plans, resample)


@dataclass(frozen=True)
class EvaluatorCost:
    """The "auto" cost model of one layer, per channel: the table evaluator's elementwise operations,
    and the separable evaluator's matrix-product multiply-adds plus its elementwise operations."""

    table: float
    separable_products: float
    separable_elementwise: float

    def separable_cost(self, matmul_advantage: float = MATMUL_ADVANTAGE) -> float:
        return self.separable_products / matmul_advantage + self.separable_elementwise

    def method(self, matmul_advantage: float = MATMUL_ADVANTAGE) -> Literal["separable", "table"]:
        return "separable" if self.separable_cost(matmul_advantage) < self.table else "table"

    def break_even(self) -> float:
        """The advantage above which "auto" picks the separable evaluator (inf: never)."""
        margin = self.table - self.separable_elementwise
        return self.separable_products / margin if margin > 0 else float("inf")


def _geometry(native_size: tuple[int, int], config: ZMaskConfig, kernels: Sequence[Kernel]):
    """Nearest-resize indices per axis, grid windows and separable weights of every kernel."""
    height, width = config.heatmap_size
    row_index = legacy_nearest_indices(native_size[0], height)
    col_index = legacy_nearest_indices(native_size[1], width)
    windows = {k: (axis_windows(height, k[0], config.pooling), axis_windows(width, k[1], config.pooling)) for k in kernels}
    separable = {
        k: (separable_axis(rows, row_index, native_size[0]), separable_axis(cols, col_index, native_size[1]))
        for k, (rows, cols) in windows.items()
    }
    return row_index, col_index, windows, separable


def layer_cost(native_size: tuple[int, int], config: ZMaskConfig, kernels: Sequence[Kernel]) -> EvaluatorCost:
    """The cost model behind ``box_method="auto"`` for one layer (what the benchmark checks)."""
    _, _, windows, separable = _geometry(native_size, config, kernels)
    return evaluator_cost(native_size, config.heatmap_size, windows, separable)


def evaluator_cost(native, grid, windows, separable) -> EvaluatorCost:
    """Per-channel operation counts of both evaluators for a native-size map and its grid windows."""
    h, w = native
    table = grid[0] * grid[1] * 6.0
    products = elementwise = 0.0
    for kernel, (rows, cols) in windows.items():
        table += rows.count * (grid[1] + 1) * 2 + rows.count * cols.count * 3
        nr, nc = (axis.weights.shape[0] for axis in separable[kernel])
        products += min(nr * h * w + nr * w * nc, h * w * nc + nr * h * nc)
        elementwise += nr * nc
    return EvaluatorCost(table, products, elementwise)


# Elements (float64 at most) that one pass of the refinement keeps in flight on a CPU: about the
# size of a last-level cache share, beyond which the table's passes become memory-bound.
_CPU_WORKING_SET = 1 << 21


class LayerRefiner:
    """Computes SPR heatmaps of layers, caching shape-dependent plans per (size, kernels, device).

    Channels are processed in chunks of at most ``config.chunk_elements`` values of the largest
    intermediate, so the memory used grows with the chunk and the heatmap size, not with the
    layer's channel count. Intermediates live in a :class:`Workspace` reused across calls when no
    gradient is needed (one refiner per thread).
    """

    def __init__(self, config: ZMaskConfig) -> None:
        self.config = config
        self._plans: dict[tuple, LayerPlan] = {}
        self.workspace = Workspace()

    def plan(self, native_size: tuple[int, int], kernels: Sequence[Kernel], device: torch.device) -> LayerPlan:
        key = (tuple(native_size), tuple(kernels), str(device))
        if key not in self._plans:
            self._plans[key] = build_plan((native_size[0], native_size[1]), self.config, kernels, device)
        return self._plans[key]

    def heatmaps(
        self, activation: torch.Tensor, stats: LayerStatistics, kernel_sets: dict[str, Sequence[Kernel]]
    ) -> dict[str, torch.Tensor]:
        """SPR heatmap (B x 1 x H_R x W_R) of one layer for each named kernel list.

        Pooled maps are shared between lists: a layer in both S and D pools each distinct kernel once.
        The images of a batch go through in groups (:meth:`_images_per_pass`) with the channel
        chunks of a single image, so an image's heatmap does not depend on its batch.
        """
        union = list(dict.fromkeys(k for kernels in kernel_sets.values() for k in kernels))
        plan = self.plan((int(activation.shape[-2]), int(activation.shape[-1])), union, activation.device)
        batch, channels = activation.shape[:2]
        group = self._images_per_pass(plan, channels, activation.device)
        if batch <= group:
            return self._batch_heatmaps(activation, stats, kernel_sets, plan)
        parts = [self._batch_heatmaps(activation[start:start + group], stats, kernel_sets, plan) for start in range(0, batch, group)]
        return {name: torch.cat([part[name] for part in parts]) for name in kernel_sets}

    def _batch_heatmaps(
        self, activation: torch.Tensor, stats: LayerStatistics, kernel_sets: dict[str, Sequence[Kernel]], plan: LayerPlan
    ) -> dict[str, torch.Tensor]:
        config = self.config
        mean, scale = stats.normaliser(config.heatmap_size, config.eps, config.std_floor)
        mean, scale = mean.to(activation.device), scale.to(activation.device)
        channels = activation.shape[1]
        reference = config.spr_variant == "reference"
        abs_sums: dict[Kernel, torch.Tensor] = {}
        paper_sums: dict[str, torch.Tensor] = {}
        paper_norms: dict[str, torch.Tensor] = {}
        for part in self._chunks(plan, channels):
            chunk = activation[:, part]
            source = self._source(chunk, _slice_channels(mean, part), _slice_channels(scale, part), plan)
            if reference:
                for kernel, kernel_plan in plan.kernels.items():
                    _accumulate(abs_sums, kernel, self._abs_channel_sum(source, chunk.shape, plan.method, kernel_plan))
                continue
            means = {k: kp.expand(self._box_means(source, chunk.shape, plan.method, kp)) for k, kp in plan.kernels.items()}
            for name, kernels in kernel_sets.items():
                product = means[kernels[0]]
                for i, kernel in enumerate(kernels[1:], start=1):
                    if i == len(kernels) - 1:
                        _accumulate(paper_norms, name, product.abs().flatten(1).amax(1), torch.maximum)
                    product = product * means[kernel]
                _accumulate(paper_sums, name, product.abs().sum(1))
        result = {}
        for name, kernels in kernel_sets.items():
            chain: torch.Tensor | None = None
            if reference:
                for kernel in kernels:
                    pooled = plan.kernels[kernel].expand((abs_sums[kernel] / channels).float())
                    if chain is None:
                        chain = pooled
                    else:
                        chain = pooled * chain / (1.0 + chain.flatten(1).amax(1).view(-1, 1, 1))
            else:
                # Paper recursion a_i = p_i * a_{i-1} / ||a_{i-1}||_inf telescopes to
                # a_m = Q_m / ||Q_{m-1}||_inf with Q_i the product of the first i pooled maps.
                chain = paper_sums[name] / channels
                if len(kernels) > 1:
                    chain = chain / paper_norms[name].clamp(min=torch.finfo(chain.dtype).tiny).view(-1, 1, 1)
            if chain is None:
                raise ConfigError(f"the kernel list {name!r} is empty")
            result[name] = chain.unsqueeze(1)
        return result

    def _per_channel(self, plan: LayerPlan) -> int:
        """Elements of the largest per-kernel intermediate of one channel of one image."""
        height, width = self.config.heatmap_size
        if plan.method == "table":
            return (height + 1) * (width + 1)
        return max(rows.shape[0] * cols.shape[0] for rows, cols in (kp.separable_weights() for kp in plan.kernels.values()))

    def _channel_step(self, plan: LayerPlan) -> int:
        return max(1, self.config.chunk_elements // self._per_channel(plan))

    def _chunks(self, plan: LayerPlan, channels: int) -> list[slice]:
        """Channel slices whose largest per-kernel intermediate, for one image, stays within
        ``chunk_elements`` (the same slices whatever the batch: the channel sums keep their order)."""
        step = self._channel_step(plan)
        return [slice(start, min(start + step, channels)) for start in range(0, channels, step)]

    def _images_per_pass(self, plan: LayerPlan, channels: int, device: torch.device) -> int:
        """How many images go through the channel chunks together: as many as ``chunk_elements``
        holds; on a CPU as many as stay within a cache-sized working set (_CPU_WORKING_SET): a
        131-channel summed-area table of 8 images (12 MB each) took 52 ms per image, one image at a
        time 29 ms (ESPNet's b2, 1 thread)."""
        per_image = self._per_channel(plan) * min(self._channel_step(plan), channels)
        budget = self.config.chunk_elements if device.type != "cpu" else min(self.config.chunk_elements, _CPU_WORKING_SET)
        return max(1, budget // per_image)

    def _source(self, chunk: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
        """What every kernel of a chunk is read from: the Z-score's summed-area table (table) or
        the native Z-score in :func:`separable_layout` (separable)."""
        chunk = chunk.float()
        if plan.method == "separable":
            return separable_layout(flush_subnormals(zscore(chunk, mean, scale), inplace=True))
        if plan.resample is not None and not chunk.requires_grad and mean.shape[-2:] == (1, 1):
            # Nearest resizing by an integer factor commutes with the per-channel Z-score: compute
            # it on the smaller of the two grids and write it into the table with the repeat as a
            # broadcast (the same numbers as resizing first, without the full-size intermediate).
            (row_kind, row_f), (col_kind, col_f) = plan.resample
            native = chunk[..., :: row_f if row_kind == "down" else 1, :: col_f if col_kind == "down" else 1]
            repeat = (row_f if row_kind == "up" else 1, col_f if col_kind == "up" else 1)
            return summed_area_table(zscore(native, mean, scale), self.workspace, repeat=repeat)
        grid = F.interpolate(chunk, size=self.config.heatmap_size, mode="nearest")
        scratch = grid.data_ptr() != chunk.data_ptr()  # interpolate made a new tensor: reuse it
        return summed_area_table(zscore(grid, mean, scale, inplace=scratch), self.workspace)

    def _box_means(self, source: torch.Tensor, shape, method: str, plan: KernelPlan) -> torch.Tensor:
        """Compact box means (B x c x rows x cols, float32) of a chunk for one kernel."""
        if method == "separable":
            pooled = box_mean_separable(source, tuple(shape), *plan.separable_weights())
            return pooled.permute(1, 2, 0, 3)
        return (box_sum_from_table(source, plan.rows, plan.cols) / window_areas(plan.rows, plan.cols)).float()

    def _abs_channel_sum(self, source: torch.Tensor, shape, method: str, plan: KernelPlan) -> torch.Tensor:
        """Sum over channels of |box mean| (B x rows x cols): the reference variant's reduction."""
        if method == "separable":
            pooled = box_mean_separable(source, tuple(shape), *plan.separable_weights(), self.workspace)
            return _abs_inplace(pooled).sum(2).transpose(0, 1)
        sums = box_sum_from_table(source, plan.rows, plan.cols, self.workspace)
        # |sum / area| = |sum| / area: reduce over channels first, divide the small map after.
        return (_abs_inplace(sums).sum(1) / window_areas(plan.rows, plan.cols).to(sums)).float()


def _abs_inplace(values: torch.Tensor) -> torch.Tensor:
    """|values|, overwriting this scratch tensor when no gradient flows through it."""
    return values.abs_() if not values.requires_grad else values.abs()


def _accumulate(store: dict, key, value: torch.Tensor, combine=torch.add) -> None:
    store[key] = value if key not in store else combine(store[key], value)


def _slice_channels(values: torch.Tensor, part: slice) -> torch.Tensor:
    return values[part] if values.shape[0] > 1 else values


def zscore_direct(activation: torch.Tensor, stats: LayerStatistics, config: ZMaskConfig) -> torch.Tensor:
    """z = (R(h) - mu) / (max(sigma, floor) + eps) on the heatmap grid (B x C x H_R x W_R); float64
    in, float64 out (the exact oracle)."""
    return zscore_grid(activation, stats, config.heatmap_size, config.eps, config.std_floor)


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
        chain: torch.Tensor | None = None
        for kernel in kernels:
            pooled = avg_pool_direct(zscore, kernel, config.pooling).abs().mean(1, keepdim=True)
            if chain is None:
                chain = pooled
            else:
                chain = pooled * chain / (1.0 + chain.flatten(1).amax(1).view(-1, 1, 1, 1))
        if chain is None:
            raise ConfigError("the kernel list is empty")
        return chain
    state = torch.ones_like(zscore)
    for kernel in kernels:
        norm = state.abs().flatten(1).amax(1).view(-1, 1, 1, 1)
        state = avg_pool_direct(zscore, kernel, config.pooling) * state / norm
    return state.abs().mean(1, keepdim=True)
