"""Box filters whose cost does not depend on the kernel size.

Two evaluators of the same quantity, the mean of a map over a grid of axis-aligned windows:

* :func:`summed_area_table` + :func:`box_mean_from_table`: one float64 integral image per map,
  shared by every kernel, then four lookups per output value;
* :func:`box_mean_separable`: per-axis weight matrices (nearest resize and window average folded
  together, see :func:`zmask.core.geometry.window_weights`) applied to a native-resolution map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .geometry import AxisWindows


def summed_area_table(grid: torch.Tensor) -> torch.Tensor:
    """Integral image of ``... x H x W`` with a leading zero row and column, in float64.

    float64 keeps the four-corner difference exact enough (float32 tables lose digits to
    cancellation once the table's values grow with the map size).
    """
    table = grid.double().cumsum(-1).cumsum(-2)
    return F.pad(table, (1, 0, 1, 0))


def box_mean_from_table(table: torch.Tensor, rows: AxisWindows, cols: AxisWindows) -> torch.Tensor:
    """Mean over each (row window x column window) from a summed-area table, as float32."""
    band = table.index_select(-2, rows.end) - table.index_select(-2, rows.start)
    sums = band.index_select(-1, cols.end) - band.index_select(-1, cols.start)
    area = rows.length.unsqueeze(1) * cols.length.unsqueeze(0)
    return (sums / area.to(sums.dtype)).float()


def box_mean_separable(native: torch.Tensor, row_weights: torch.Tensor, col_weights: torch.Tensor) -> torch.Tensor:
    """``row_weights @ native @ col_weights.T`` over the last two axes, in the cheaper order."""
    rows_out, height = row_weights.shape
    cols_out, width = col_weights.shape
    rows_first = rows_out * height * width + rows_out * width * cols_out
    cols_first = height * width * cols_out + rows_out * height * cols_out
    if rows_first <= cols_first:
        return torch.matmul(torch.matmul(row_weights, native), col_weights.transpose(0, 1))
    return torch.matmul(row_weights, torch.matmul(native, col_weights.transpose(0, 1)))
