"""Reports: machine-readable JSON, a Markdown summary with the paper's table layouts, and figures.

Figures are drawn on ``matplotlib.figure.Figure`` objects, which render with the Agg canvas on
their own: matplotlib is imported only when a figure is made, and its global backend is never touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contracts import Task


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def markdown_table(rows: list[str], columns: list[str], cell) -> str:
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(cell(row, column) for column in columns) + " |")
    return "\n".join(lines)


def fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def fmt_interval(value: Any, interval: list[float] | None, digits: int = 3) -> str:
    """``value [low, high]`` (just the value when there is no interval)."""
    if interval is None or value is None:
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(interval[0], 2)}, {fmt(interval[1], 2)}]"


def _figure(width: float, height: float, rows: int = 1, columns: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def roc_figure(path: Path, curves: dict[str, tuple[list[float], list[float]]], title: str) -> None:
    """ROC curves: name -> (clean scores, patched scores)."""
    from sklearn.metrics import roc_curve

    figure, axes = _figure(4.5, 4)
    axis = axes[0, 0]
    for name, (clean, patched) in curves.items():
        if not clean or not patched:
            continue
        fpr, tpr, _ = roc_curve([0] * len(clean) + [1] * len(patched), clean + patched)
        axis.plot(fpr, tpr, label=name)
    axis.plot([0, 1], [0, 1], ":", color="gray")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def sweep_figure(path: Path, xs: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str, title: str) -> None:
    figure, axes = _figure(5, 3.6)
    axis = axes[0, 0]
    for name, ys in series.items():
        axis.plot(xs, ys, marker="o", label=name)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def examples_figure(path: Path, rows: list[dict[str, Any]], task: Task) -> None:
    """The paper's Fig. 6 layout: columns clean / attacked / attacked + defended; input above, the
    prediction (drawn by ``task.render``) below."""
    figure, axes = _figure(9, 3.2 * len(rows), 2 * len(rows), 3)
    for r, row in enumerate(rows):
        for c, (label, image, output) in enumerate(row["panels"]):
            axes[2 * r, c].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            axes[2 * r, c].set_title(label, fontsize=9)
            task.render(axes[2 * r + 1, c], image, output)
            for axis in (axes[2 * r, c], axes[2 * r + 1, c]):
                axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
