"""Reading images and label maps with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ZMaskError

# Decompression-bomb guard: refuse images larger than this many pixels.
MAX_PIXELS = 64 * 1024 * 1024


def _open(path: Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ZMaskError(f"{what} {path} does not exist")
    try:
        image = Image.open(path)
        if image.width * image.height > MAX_PIXELS:
            raise ZMaskError(f"{what} {path} has {image.width}x{image.height} pixels, more than the {MAX_PIXELS} allowed")
        image.load()
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ZMaskError(f"cannot read {what} {path}: {error}") from None


def read_image(path: str | Path) -> torch.Tensor:
    """An RGB image as a float tensor 3 x H x W in [0, 1]."""
    array = np.asarray(_open(Path(path), "image").convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def read_label(path: str | Path) -> torch.Tensor:
    """A single-channel label map as an int64 tensor H x W."""
    image = _open(Path(path), "label map")
    if image.mode not in ("L", "P", "I", "I;16"):
        raise ZMaskError(f"label map {Path(path)} has mode {image.mode}; expected a single-channel image of class indices")
    return torch.from_numpy(np.asarray(image).astype(np.int64))
