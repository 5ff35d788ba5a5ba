"""Stacking a dataset's images into batches (for statistics and other passes that need no labels)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def image_batches(dataset: Dataset, batch_size: int) -> list[torch.Tensor]:
    """The ``"image"`` of every item of ``dataset``, in order, stacked into B x C x H x W batches of
    at most ``batch_size``."""
    return [torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, len(dataset)))])
            for start in range(0, len(dataset), batch_size)]
