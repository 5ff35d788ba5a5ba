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


def summed_area_table(grid: torch.Tensor) -> torch.Tensor:
    """Integral image of ``... x H x W`` with a leading zero row and column, in float64.

    float64 keeps differences of table entries exact enough: float32 tables lose digits to
    cancellation once their values grow with the map size.
    """
    if grid.requires_grad:  # out= is not differentiable; the padded form is
        return F.pad(torch.cumsum(grid, -1, dtype=torch.float64), (1, 0, 1, 0)).cumsum(-2)
    height, width = grid.shape[-2:]
    table = grid.new_empty((*grid.shape[:-2], height + 1, width + 1), dtype=torch.float64)
    table[..., 0, :] = 0
    table[..., :, 0] = 0
    torch.cumsum(grid, -1, dtype=torch.float64, out=table[..., 1:, 1:])
    return table.cumsum_(-2)  # row 0 is zero, so the running sum over all rows is the table


def _difference(table: torch.Tensor, windows: AxisWindows, dim: int) -> torch.Tensor:
    """table[end] - table[start] along ``dim``, by slicing when the windows are consecutive."""
    length = windows.uniform_length()
    if length is not None:
        first = int(windows.start[0])
        return table.narrow(dim, first + length, windows.count) - table.narrow(dim, first, windows.count)
    return table.index_select(dim, windows.end) - table.index_select(dim, windows.start)


# float32 column differences lose about 6e-8 * W / k_w of the map's scale to cancellation; allow
# them only where that stays near 1e-6.
_FLOAT32_MAX_WIDTH_RATIO = 20


def box_sum_from_table(table: torch.Tensor, rows: AxisWindows, cols: AxisWindows) -> torch.Tensor:
    """Sum over each (row window x column window) from a summed-area table.

    The row difference is taken in float64 (it removes the large prefix sums along H). When the
    column windows are wide relative to the map, the column difference then runs in float32 at
    half the memory traffic; the result is float32 in that case and float64 otherwise.
    """
    band = _difference(table, rows, -2)
    width = table.shape[-1] - 1
    if width <= _FLOAT32_MAX_WIDTH_RATIO * int(cols.length.min()):
        band = band.float()
    return _difference(band, cols, -1)


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
            raise ValueError(f"kernel ({kh}, {kw}) does not fit a {height} x {width} map")
        rows = AxisWindows(torch.arange(height - kh + 1), torch.arange(kh, height + 1), torch.arange(height - kh + 1))
        cols = AxisWindows(torch.arange(width - kw + 1), torch.arange(kw, width + 1), torch.arange(width - kw + 1))
        results.append((box_sum_from_table(table, rows.to(grid.device), cols.to(grid.device)) / (kh * kw)).float())
    return results


def box_mean_separable(native: torch.Tensor, row_weights: torch.Tensor, col_weights: torch.Tensor) -> torch.Tensor:
    """``row_weights @ native @ col_weights.T`` over the last two axes, in the cheaper order."""
    rows_out, height = row_weights.shape
    cols_out, width = col_weights.shape
    rows_first = rows_out * height * width + rows_out * width * cols_out
    cols_first = height * width * cols_out + rows_out * height * cols_out
    if rows_first <= cols_first:
        return torch.matmul(torch.matmul(row_weights, native), col_weights.transpose(0, 1))
    return torch.matmul(row_weights, torch.matmul(native, col_weights.transpose(0, 1)))


def abs_channel_sum_separable(native: torch.Tensor, row_weights: torch.Tensor, col_weights: torch.Tensor) -> torch.Tensor:
    """Sum over channels of ``|row_weights @ native_c @ col_weights.T|`` (B x rows x cols).

    Laid out so that both products are single large matrix multiplications (the row product runs
    over all batch items and channels at once), which is several times faster than broadcasting.
    """
    batch, channels, height, _ = native.shape
    across = torch.matmul(native, col_weights.transpose(0, 1))  # B x C x h x cols
    cols = across.shape[-1]
    stacked = across.permute(2, 0, 1, 3).reshape(height, batch * channels * cols)
    pooled = torch.matmul(row_weights, stacked).view(-1, batch, channels, cols)  # rows x B x C x cols
    pooled = pooled.abs_() if not pooled.requires_grad else pooled.abs()
    return pooled.sum(2).transpose(0, 1)
