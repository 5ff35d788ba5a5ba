"""A test-time proxy for a printed patch seen by a camera (the paper's Fig. 8, without APRICOT).

:class:`PhysicalConditions` turns a digital patch into what a camera might record of its print:
a printer's limited gamut and tone curve, a lighting and white-balance change, defocus blur and
JPEG compression of the patch's pixels, and a perspective view of the result (blurring after the
warp would mix in the pixels outside the warped footprint). Each draw is seeded; the transformed patch comes with its
footprint (a perspective view is no longer a rectangle), which becomes the true patch mask.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..errors import ConfigError


def _jpeg(piece: torch.Tensor, quality: int) -> torch.Tensor:
    """``piece`` (1 or 3 x h x w in [0, 1]) through an 8-bit JPEG encode and decode at ``quality`` (Pillow)."""
    channels = piece.shape[0]
    if channels not in (1, 3):
        raise ConfigError(f"JPEG compression needs a 1- or 3-channel patch, not {channels} channels: set jpeg_quality=(100, 100)")
    pixels = (piece.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buffer, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    return torch.from_numpy(decoded.reshape(*decoded.shape[:2], channels)).permute(2, 0, 1).to(piece.device, piece.dtype)


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> None:
    if len(bounds) != 2 or not low <= bounds[0] <= bounds[1] <= high:
        raise ConfigError(f"{name}={bounds!r} must be (min, max) with {low} <= min <= max <= {high}")


@dataclass(frozen=True)
class PhysicalConditions:
    """Ranges of the physical effects, each drawn uniformly per placement.

    ``print_gamut``: the darkest and brightest printable levels (a print is never pure black or
    white); ``print_gamma``: range of the printer's tone-curve exponent; ``brightness``: additive
    lighting shift in +-value; ``contrast``: multiplicative contrast in 1 +- value; ``colour_gain``:
    per-channel white-balance gain in 1 +- value; ``perspective``: how far each corner may move, as
    a fraction of the patch side (a view from off the patch's axis); ``blur_sigma``: Gaussian
    defocus in pixels; ``jpeg_quality``: camera compression quality range (100: off).
    """

    print_gamut: tuple[float, float] = (0.06, 0.92)
    print_gamma: tuple[float, float] = (0.8, 1.25)
    brightness: float = 0.12
    contrast: float = 0.2
    colour_gain: float = 0.1
    perspective: float = 0.15
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    jpeg_quality: tuple[int, int] = (50, 90)

    def __post_init__(self) -> None:
        _check_range("print_gamut", self.print_gamut, 0.0, 1.0)
        _check_range("print_gamma", self.print_gamma, 0.1, 10.0)
        _check_range("blur_sigma", self.blur_sigma, 0.0, 20.0)
        _check_range("jpeg_quality", self.jpeg_quality, 1, 100)
        for name in ("brightness", "contrast", "colour_gain"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must lie in [0, 1]")
        if not 0.0 <= self.perspective < 0.5:
            raise ConfigError(f"perspective={self.perspective!r} must lie in [0, 0.5)")

    def __call__(self, patch: torch.Tensor, footprint: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch, footprint) -> the same as a camera would see them: C x h x w in [0, 1] and 1 x h x w in {0, 1}."""
        uniform = lambda low, high: low + (high - low) * float(torch.rand((), generator=generator))  # noqa: E731
        dark, bright = self.print_gamut
        piece = dark + (bright - dark) * patch.clamp(0, 1) ** uniform(*self.print_gamma)
        gain = 1 + self.colour_gain * (2 * torch.rand(piece.shape[0], 1, 1, generator=generator) - 1)
        piece = (piece - 0.5) * uniform(1 - self.contrast, 1 + self.contrast) + 0.5
        piece = (piece * gain.to(piece) + uniform(-self.brightness, self.brightness)).clamp(0, 1)
        sigma = uniform(*self.blur_sigma)
        if sigma > 0:
            kernel = 2 * max(1, round(3 * sigma)) + 1
            piece = TF.gaussian_blur(piece, [kernel, kernel], [sigma, sigma])
        quality = round(uniform(*self.jpeg_quality))
        if quality < 100:
            piece = _jpeg(piece, quality)
        height, width = piece.shape[-2:]
        if self.perspective > 0:
            corners = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
            moved = [[min(max(x + uniform(-1, 1) * self.perspective * width, 0), width - 1),
                      min(max(y + uniform(-1, 1) * self.perspective * height, 0), height - 1)] for x, y in corners]
            warped = TF.perspective(torch.cat([piece, footprint.to(piece)]), corners, moved, interpolation=TF.InterpolationMode.BILINEAR)
            piece, footprint = warped[:-1], (warped[-1:] > 0.5).to(footprint.dtype)
        return piece.clamp(0, 1), footprint
