"""In-memory cache of a dataset's items (images kept as 8-bit to save memory)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from .batching import dataset_length


class CachedDataset(Dataset):
    """Decodes each item once; images in [0, 1] are stored as uint8 and restored exactly on access."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._items: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return dataset_length(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index not in self._items:
            item = dict(self.dataset[index])
            item["image"] = (item["image"] * 255).round().to(torch.uint8)
            self._items[index] = item
        item = dict(self._items[index])
        item["image"] = item["image"].float() / 255
        return item
