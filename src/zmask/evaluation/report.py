"""Reports: machine-readable JSON, a Markdown summary with the paper's table layouts, and figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

PALETTE_CAMVID = np.array([
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 0),
], dtype=np.uint8)


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


def roc_figure(path: Path, curves: dict[str, tuple[list[float], list[float]]], title: str) -> None:
    """ROC curves: name -> (clean scores, patched scores)."""
    figure, axis = plt.subplots(figsize=(4.5, 4))
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
    plt.close(figure)


def sweep_figure(path: Path, xs: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str, title: str) -> None:
    figure, axis = plt.subplots(figsize=(5, 3.6))
    for name, ys in series.items():
        axis.plot(xs, ys, marker="o", label=name)
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def colorize(prediction: torch.Tensor) -> np.ndarray:
    index = prediction.clamp(0, len(PALETTE_CAMVID) - 1).numpy()
    return PALETTE_CAMVID[index]


def examples_figure(path: Path, rows: list[dict[str, Any]], task: str, names: list[str] | None = None) -> None:
    """The paper's Fig. 6 layout: columns clean / attacked / attacked + defended; input above, prediction below."""
    figure, axes = plt.subplots(2 * len(rows), 3, figsize=(9, 3.2 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (label, image, output) in enumerate(row["panels"]):
            axes[2 * r, c].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            axes[2 * r, c].set_title(label, fontsize=9)
            if task == "segmentation":
                axes[2 * r + 1, c].imshow(colorize(output.argmax(0) if output.dim() == 3 else output))
            else:
                axes[2 * r + 1, c].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
                keep = output["scores"] > 0.25
                for (x1, y1, x2, y2) in output["boxes"][keep].tolist():
                    axes[2 * r + 1, c].add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="yellow", linewidth=1))
            for axis in (axes[2 * r, c], axes[2 * r + 1, c]):
                axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
