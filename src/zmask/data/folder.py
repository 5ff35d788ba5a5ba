"""A plain folder of images (no labels), e.g. for ``zmask defend``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import ZMaskError
from .io import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolder(Dataset):
    """Items: ``image`` (3 x H x W in [0, 1]) and ``path``, sorted by file name."""

    def __init__(self, root: str | Path, limit: int | None = None) -> None:
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
