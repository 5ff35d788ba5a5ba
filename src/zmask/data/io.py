"""Reading images and label maps with errors that name the file.

Images of every bit depth are scaled to [0, 1] by their own range: 8-bit modes (1, L, P, RGB,
RGBA, CMYK, ...) by 255; 16-bit grey (PIL modes ``I;16*``, and ``I``, the 32-bit integer mode
PIL gives some 16-bit files, whose values must then lie in [0, 65535]) by 65535; 32-bit float
(mode ``F``, e.g. float TIFF) as is, if its values lie in [0, 1] (otherwise its range is unknown
and it is refused by name). Grey images are repeated into three channels.

An image's EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), as every viewer does: a
phone photo stored sideways with "rotate 90" in its EXIF is read upright, at its displayed size.
Label maps are read as stored.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from struct import error as struct_error

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ZMaskError

# Decompression-bomb guard: refuse images larger than this many pixels, whatever PIL's own
# ``Image.MAX_IMAGE_PIXELS`` is set to (PIL's errors and warnings become this refusal too).
MAX_PIXELS = 64 * 1024 * 1024

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _open(path: Path, what: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise ZMaskError(f"{what} {path} does not exist")
    too_large = f"{what} {path} has more than the {MAX_PIXELS} pixels allowed (a decompression bomb or a huge image)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if image.width * image.height > MAX_PIXELS:
                raise ZMaskError(f"{what} {path} has {image.width}x{image.height} pixels, more than the {MAX_PIXELS} allowed")
            image.load()
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ZMaskError(too_large) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        if isinstance(error, ZMaskError):
            raise
        raise ZMaskError(f"cannot read {what} {path}: {error}") from None


def _unit_range(image: Image.Image, path: Path) -> np.ndarray:
    """H x W x 3 float32 in [0, 1], scaled by the image's bit depth (see the module docstring)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        grey = np.asarray(image).astype(np.float32)
        if mode == "I" and grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ZMaskError(f"image {path} has 32-bit integer pixels in [{grey.min():.0f}, {grey.max():.0f}]; "
                             "zmask reads integer images of up to 16 bits (save it as 8- or 16-bit)")
        return np.repeat((grey / 65535.0)[..., None], 3, axis=2)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        if not np.isfinite(grey).all() or (grey.size and (grey.min() < 0 or grey.max() > 1)):
            low, high = (float(np.nanmin(grey)), float(np.nanmax(grey))) if grey.size else (0.0, 0.0)
            raise ZMaskError(f"image {path} is a float image with values in [{low:.4g}, {high:.4g}] (or NaN/Inf); "
                             "zmask reads float images only with values in [0, 1]: rescale it")
        return np.repeat(grey[..., None], 3, axis=2)
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ZMaskError(f"image {path} has mode {mode}, which cannot be read as RGB: {error}") from None
    return np.asarray(rgb, dtype=np.uint8).astype(np.float32) / 255.0


def read_image(path: str | Path) -> torch.Tensor:
    """An RGB image as a float tensor 3 x H x W in [0, 1], scaled by its bit depth (8-bit, 16-bit,
    float in [0, 1]); other images are refused with ``ZMaskError`` naming the file."""
    path = Path(path)
    array = _unit_range(_upright(_open(path, "image"), path), path)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()


def _upright(image: Image.Image, path: Path) -> Image.Image:
    """``image`` with its EXIF orientation applied (the image itself when it has none)."""
    try:
        orientation = image.getexif().get(0x0112, 1)  # 0x0112: the EXIF Orientation tag
    except (OSError, ValueError, SyntaxError, struct_error):  # unreadable EXIF: read the pixels as stored
        return image
    if orientation in (1, None) or orientation not in range(2, 9):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, struct_error) as error:
        raise ZMaskError(f"cannot apply the EXIF orientation of image {path}: {error}") from None


def read_label(path: str | Path) -> torch.Tensor:
    """A single-channel label map as an int64 tensor H x W."""
    image = _open(Path(path), "label map")
    if image.mode not in ("L", "P", "I", "I;16"):
        raise ZMaskError(f"label map {Path(path)} has mode {image.mode}; expected a single-channel image of class indices")
    return torch.from_numpy(np.asarray(image).astype(np.int64))
