"""Images are read upright: the EXIF orientation a camera records is applied, as viewers do."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from zmask.data import read_image


def _tagged(path, orientation: int) -> None:
    """A 20 x 40 image, white in its 10 left columns, stored with EXIF ``orientation``."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif.tobytes())


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    path = tmp_path / f"sideways{suffix}"
    _tagged(path, 6)  # 6: shown rotated 90 degrees clockwise
    image = read_image(path)
    assert tuple(image.shape) == (3, 40, 20)  # upright: tall, not wide
    assert float(image[:, :8].mean()) > 0.9 and float(image[:, -8:].mean()) < 0.1  # the left band is now the top
    _tagged(path, 3)  # 3: upside down
    image = read_image(path)
    assert tuple(image.shape) == (3, 20, 40) and float(image[:, :, -8:].mean()) > 0.9


def test_no_or_normal_orientation_reads_as_stored(tmp_path):
    path = tmp_path / "plain.png"
    _tagged(path, 1)
    image = read_image(path)
    assert tuple(image.shape) == (3, 20, 40) and float(image[:, :, :8].mean()) > 0.9
