"""Box filters whose cost does not depend on the kernel size.

Two evaluators of the same quantity, the sum or mean of a map over a grid of axis-aligned windows:

* :func:`summed_area_table` + :func:`box_sum_from_table`: one float64 integral image per map,
  shared by every kernel, then differences of table entries;
* :func:`box_mean_separable`: per-axis weight matrices (nearest resize and window average folded
  together, see :func:`zmask.core.geometry.separable_axis`) applied to a native-resolution map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .geometry import AxisWindows
from ..errors import ConfigError


def summed_area_table(grid: torch.Tensor, workspace: Workspace | None = None, repeat: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Integral image of ``... x H x W`` with a leading zero row and column, in float64.

    float64 keeps differences of table entries exact enough: float32 tables lose digits to
    cancellation once their values grow with the map size. With a ``workspace`` (and no gradient)
    the table is built in place in a reused buffer. ``repeat`` = (fh, fw) builds the table of the
    map with every row repeated fh times and every column fw times (a nearest upsampling), which
    is written into the table directly (needs a workspace).
    """
    if workspace is None or grid.requires_grad:
        if repeat != (1, 1):
            grid = grid.repeat_interleave(repeat[0], -2).repeat_interleave(repeat[1], -1)
        return F.pad(torch.cumsum(grid, -1, dtype=torch.float64), (1, 0, 1, 0)).cumsum(-2)
    (fh, fw), (height, width) = repeat, grid.shape[-2:]
    leading = grid.shape[:-2]
    table = workspace.take("table", (*leading, fh * height + 1, fw * width + 1), torch.float64, grid.device)
    table[..., 0, :].zero_()
    table[..., 1:, 0].zero_()
    inner = table[..., 1:, 1:]
    if fw > 1:  # repeat columns in a contiguous copy first: a broadcast innermost dimension copies slowly
        grid = grid[..., None].expand(*grid.shape, fw).reshape(*leading, height, width * fw)
    inner.view(*leading, height, fh, width * fw).copy_(grid[..., :, None, :])
    return table.cumsum_(-1).cumsum_(-2)


def _difference(table: torch.Tensor, windows: AxisWindows, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """table[end] - table[start] along ``dim``, by slicing when the windows are consecutive.

    ``out`` (optional, windows are consecutive) receives the result, possibly in a narrower dtype.
    """
    length = windows.uniform_length()
    if length is not None:
        first = int(windows.start[0])
        upper, lower = table.narrow(dim, first + length, windows.count), table.narrow(dim, first, windows.count)
        return torch.sub(upper, lower, out=out) if out is not None else upper - lower
    if windows.same_offsets is not None and windows.count == table.shape[dim] - 1:
        before, after = windows.same_offsets
        if out is not None and before + after < windows.count:
            return _clipped_difference(table, dim, before, after, out)
        # Clipped windows [j - before, j + after + 1): pad the table by repeating its first and
        # last entries, then every window is a plain slice difference.
        padded = _replicate_pad(table, dim, before, after)
        upper, lower = padded.narrow(dim, before + after + 1, windows.count), padded.narrow(dim, 0, windows.count)
        return torch.sub(upper, lower, out=out) if out is not None else upper - lower
    return table.index_select(dim, windows.end) - table.index_select(dim, windows.start)


def _clipped_difference(table: torch.Tensor, dim: int, before: int, after: int, out: torch.Tensor) -> torch.Tensor:
    """The clipped windows [max(j - before, 0), min(j + after + 1, n)) of an n + 1 entry table,
    written into ``out`` in three slices (left edge, interior, right edge) without padding a copy."""
    n = table.shape[dim] - 1
    kernel = before + after + 1
    torch.sub(table.narrow(dim, after + 1, before), table.narrow(dim, 0, 1), out=out.narrow(dim, 0, before))
    torch.sub(table.narrow(dim, kernel, n - kernel + 1), table.narrow(dim, 0, n - kernel + 1), out=out.narrow(dim, before, n - kernel + 1))
    torch.sub(table.narrow(dim, n, 1), table.narrow(dim, n - after - before, after), out=out.narrow(dim, n - after, after))
    return out


def _replicate_pad(table: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    parts = [table.narrow(dim, 0, 1).expand(*table.shape[:dim % table.dim()], before, *table.shape[dim % table.dim() + 1:])] if before else []
    parts.append(table)
    if after:
        last = table.narrow(dim, table.shape[dim] - 1, 1)
        parts.append(last.expand(*table.shape[:dim % table.dim()], after, *table.shape[dim % table.dim() + 1:]))
    return torch.cat(parts, dim)


# float32 column differences lose about 6e-8 * W / k_w of the map's scale to cancellation; allow
# them only where that stays near 1e-6.
_FLOAT32_MAX_WIDTH_RATIO = 20


def column_dtype(width: int, cols: AxisWindows) -> torch.dtype:
    """Precision needed for the column difference of a table ``width`` columns wide."""
    return torch.float32 if width <= _FLOAT32_MAX_WIDTH_RATIO * int(cols.length.min()) else torch.float64


def box_sum_from_table(table: torch.Tensor, rows: AxisWindows, cols: AxisWindows, workspace: Workspace | None = None) -> torch.Tensor:
    """Sum over each (row window x column window) from a summed-area table.

    The row difference is taken in float64 (it removes the large prefix sums along H). When the
    column windows are wide relative to the map (:func:`column_dtype`), the column difference then
    runs in float32 at half the memory traffic. With a ``workspace`` and consecutive windows (the
    default geometry) both differences are written into reused buffers instead of new tensors.
    """
    dtype = column_dtype(table.shape[-1] - 1, cols)
    if workspace is None or table.requires_grad or not (_sliceable(rows, table, -2) and _sliceable(cols, table, -1)):
        return _difference(_difference(table, rows, -2).to(dtype), cols, -1)
    leading = table.shape[:-2]
    band = workspace.take("band", (*leading, rows.count, table.shape[-1]), dtype, table.device)
    _difference(table, rows, -2, out=band)
    sums = workspace.take("sums", (*leading, rows.count, cols.count), dtype, table.device)
    return _difference(band, cols, -1, out=sums)


def _sliceable(windows: AxisWindows, table: torch.Tensor, dim: int) -> bool:
    return windows.uniform_length() is not None or (windows.same_offsets is not None and windows.count == table.shape[dim] - 1)


def window_areas(rows: AxisWindows, cols: AxisWindows) -> torch.Tensor:
    """Number of grid cells in each (row window x column window), float64."""
    return (rows.length.unsqueeze(1) * cols.length.unsqueeze(0)).double()


def box_mean_from_table(table: torch.Tensor, rows: AxisWindows, cols: AxisWindows) -> torch.Tensor:
    """Mean over each (row window x column window) from a summed-area table, as float32."""
    return (box_sum_from_table(table, rows, cols) / window_areas(rows, cols).to(table.device)).float()


def box_filter(grid: torch.Tensor, kernels: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Stride-1 unpadded box means of ``... x H x W`` for each kernel, from one shared table.

    Equals ``[avg_pool2d(grid, k, stride=1) for k in kernels]`` (float32 out), at a cost that does
    not depend on the kernel sizes.
    """
    height, width = grid.shape[-2:]
    table = summed_area_table(grid)
    results = []
    for kh, kw in kernels:
        if not (1 <= kh <= height and 1 <= kw <= width):
            raise ConfigError(f"kernel ({kh}, {kw}) does not fit a {height} x {width} map")
        rows = AxisWindows(torch.arange(height - kh + 1), torch.arange(kh, height + 1), torch.arange(height - kh + 1))
        cols = AxisWindows(torch.arange(width - kw + 1), torch.arange(kw, width + 1), torch.arange(width - kw + 1))
        results.append((box_sum_from_table(table, rows.to(grid.device), cols.to(grid.device)) / (kh * kw)).float())
    return results


def separable_layout(native: torch.Tensor) -> torch.Tensor:
    """B x C x h x w -> (h * B * C) x w: the layout in which both separable products are single ``mm``."""
    batch, channels, height, width = native.shape
    return native.permute(2, 0, 1, 3).reshape(height * batch * channels, width)


def box_mean_separable(
    stacked: torch.Tensor, shape: tuple[int, int, int, int], row_weights: torch.Tensor, col_weights: torch.Tensor,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``row_weights @ native_c @ col_weights.T`` for every item and channel: rows x B x C x cols.

    ``stacked`` is :func:`separable_layout` of a B x C x h x w map of shape ``shape``; both products
    then run as one large matrix multiplication each (several times faster than broadcasting).
    """
    batch, channels, height, _ = shape
    cols = col_weights.shape[0]
    buffers = workspace if workspace is not None and not stacked.requires_grad else None
    across = buffers.take("across", (stacked.shape[0], cols), stacked.dtype, stacked.device) if buffers is not None else None
    across = torch.mm(stacked, col_weights.transpose(0, 1), out=across)
    rows_out = (row_weights.shape[0], batch * channels * cols)
    pooled = buffers.take("pooled", rows_out, stacked.dtype, stacked.device) if buffers is not None else None
    pooled = torch.mm(row_weights, across.view(height, batch * channels * cols), out=pooled)
    return pooled.view(-1, batch, channels, cols)


class Workspace:
    """Reusable flat buffers, so that the refinement's inner loop does not allocate per kernel.

    Fresh multi-megabyte allocations cost page faults on every call; buffers kept here are sized
    by the largest request (bounded by the refinement's chunk size) and reused. Not thread-safe:
    one workspace per refiner.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``shape`` backed by the buffer ``name`` (its previous contents are garbage)."""
        count = 1
        for size in shape:
            count *= int(size)
        key = (name, dtype, str(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < count:
            buffer = torch.empty(count, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:count].view(shape)

    @property
    def nbytes(self) -> int:
        """Memory held by the buffers."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()
