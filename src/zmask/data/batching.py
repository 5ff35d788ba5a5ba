"""Stacking a dataset's images into batches (for statistics and other passes that need no labels),
and the length of a map-style dataset."""

from __future__ import annotations

from collections.abc import Sized

import torch
from torch.utils.data import Dataset

from ..errors import ZMaskTypeError


def dataset_length(dataset: Dataset) -> int:
    """``len(dataset)``. zmask reads datasets by index, so they must define ``__len__``, which
    ``torch.utils.data.Dataset`` leaves to subclasses; without it a ``ZMaskTypeError`` (a ``TypeError``)."""
    if not isinstance(dataset, Sized):
        raise ZMaskTypeError(f"a map-style dataset with a length (__len__) is needed, got {type(dataset).__name__}")
    return len(dataset)


def image_batches(dataset: Dataset, batch_size: int) -> list[torch.Tensor]:
    """The ``"image"`` of every item of ``dataset``, in order, stacked into B x C x H x W batches of
    at most ``batch_size``."""
    length = dataset_length(dataset)
    return [torch.stack([dataset[i]["image"] for i in range(start, min(start + batch_size, length))])
            for start in range(0, length, batch_size)]
