"""A plain folder of images (no labels), e.g. for ``zmask defend``; segmentation items resized to one size."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ZMaskError
from ..validation import check_limit
from .io import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolder(Dataset):
    """Items: ``image`` (3 x H x W in [0, 1]) and ``path``, sorted by file name."""

    def __init__(self, root: str | Path, limit: int | None = None) -> None:
        limit = check_limit(limit)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ZMaskError(f"image folder {self.root} does not exist")
        self.paths = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ZMaskError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {self.root}")
        self.paths = self.paths[:limit] if limit is not None else self.paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        return {"image": read_image(self.paths[index]), "path": str(self.paths[index])}


class ResizedSegmentation(Dataset):
    """Items of a segmentation dataset (``image``, ``label``) resized to ``size`` (H, W): bilinear
    for the image, nearest for the label, so that every item stacks into one batch."""

    def __init__(self, dataset: Dataset, size: tuple[int, int]) -> None:
        self.dataset = dataset
        self.size = (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        item = dict(self.dataset[index])
        image, label = item["image"], item["label"]
        if tuple(image.shape[1:]) != self.size:
            item["image"] = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
        if tuple(label.shape) != self.size:
            item["label"] = F.interpolate(label[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        return item
