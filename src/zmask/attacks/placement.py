"""Patch application g_gamma(x, delta): placement, scale and appearance (EOT), differentiable in the patch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ZMaskError
from ..validation import check_patch


@dataclass(frozen=True)
class EOTConfig:
    """Expectation-over-transformation settings (spec 4.1), sampled per image.

    scale: uniform range of the patch scale (bilinear, anchored at the top-left corner);
    noise_std: Gaussian pixel noise (in [0, 1] units); brightness: additive shift, uniform in
    +-brightness; contrast: factor 1 + contrast * N(0, 1); rotation_degrees: uniform in +-value;
    quantize: round the patch to 8-bit levels (test time, no gradient needed).
    """

    scale: tuple[float, float] = (0.9, 1.2)
    noise_std: float = 0.05
    brightness: float = 0.0
    contrast: float = 0.1
    rotation_degrees: float = 0.0
    quantize: bool = False

    @classmethod
    def none(cls, quantize: bool = True) -> EOTConfig:
        """No transformation: the patch as printed (8-bit), at its own size."""
        return cls(scale=(1.0, 1.0), noise_std=0.0, brightness=0.0, contrast=0.0, rotation_degrees=0.0, quantize=quantize)


@dataclass
class PatchedBatch:
    """Images with the patch pasted in, and where it landed.

    masks: binary footprint (B x 1 x H x W, 1 on the patch); boxes: its bounding box (B x 4 xyxy).
    """

    images: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor


PatchTransform = Callable[[torch.Tensor, torch.Tensor, "torch.Generator | None"], tuple[torch.Tensor, torch.Tensor]]


def apply_patch(
    images: torch.Tensor,
    patch: torch.Tensor,
    generator: torch.Generator | None = None,
    eot: EOTConfig = EOTConfig(),
    position: tuple[int, int] | None = None,
    allow_border: bool = False,
    transform: PatchTransform | None = None,
) -> PatchedBatch:
    """Paste ``patch`` (C x h x w in [0, 1]) into every image of ``images`` (B x C x H x W).

    ``transform(piece, footprint, generator) -> (piece, footprint)`` changes the scaled patch and
    its footprint before it is pasted (e.g. :class:`zmask.attacks.PhysicalConditions`); the
    returned footprint is the true patch mask.

    ``position``: fixed top-left corner (row, col) of the scaled patch; otherwise uniform at random
    such that it lies inside the image. With ``allow_border`` a random corner may put part of the
    patch outside (that part is cropped); without it a patch that cannot fit is an error.
    """
    check_patch(patch, channels=int(images.shape[1]))
    batch, _, height, width = images.shape
    patched, masks, boxes = [], [], []
    for index in range(batch):
        scale = _uniform(eot.scale, generator)
        size_h, size_w = max(1, round(patch.shape[1] * scale)), max(1, round(patch.shape[2] * scale))
        if not allow_border and (size_h > height or size_w > width):
            raise ZMaskError(f"the patch ({size_h}x{size_w} after scaling) is larger than the image ({height}x{width}); use a smaller patch or allow_border=True")
        piece = _appearance(patch, (size_h, size_w), eot, generator)
        footprint = torch.ones(1, size_h, size_w, dtype=piece.dtype, device=piece.device)
        if eot.rotation_degrees:
            piece, footprint = _rotate(piece, footprint, _uniform((-eot.rotation_degrees, eot.rotation_degrees), generator))
        if transform is not None:
            piece, footprint = transform(piece, footprint, generator)
        top, left = position if position is not None else _random_corner(height, width, size_h, size_w, allow_border, generator)
        if position is not None and not allow_border and (top < 0 or left < 0 or top + size_h > height or left + size_w > width):
            raise ZMaskError(f"a {size_h}x{size_w} patch at {position} does not fit in a {height}x{width} image")
        canvas, mask = _place(piece, footprint, top, left, height, width)
        image = images[index]
        patched.append(image * (1 - mask) + canvas * mask)
        masks.append(mask)
        boxes.append(torch.tensor([max(left, 0), max(top, 0), min(left + size_w, width), min(top + size_h, height)], dtype=torch.float32))
    return PatchedBatch(torch.stack(patched), torch.stack(masks), torch.stack(boxes).to(images.device))


def _uniform(bounds: tuple[float, float], generator: torch.Generator | None) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand((), generator=generator))


def _appearance(patch: torch.Tensor, size: tuple[int, int], eot: EOTConfig, generator: torch.Generator | None) -> torch.Tensor:
    piece = patch if tuple(patch.shape[1:]) == size else F.interpolate(patch[None], size=size, mode="bilinear", align_corners=False)[0]
    if eot.contrast:
        piece = piece * (1 + eot.contrast * float(torch.randn((), generator=generator)))
    if eot.brightness:
        piece = piece + _uniform((-eot.brightness, eot.brightness), generator)
    if eot.noise_std:
        piece = piece + eot.noise_std * torch.randn(piece.shape, generator=generator).to(piece)
    piece = piece.clamp(0, 1)
    if eot.quantize:
        piece = (piece * 255).round() / 255
    return piece


def _rotate(piece: torch.Tensor, footprint: torch.Tensor, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    angle = math.radians(degrees)
    theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]], dtype=piece.dtype, device=piece.device)
    stacked = torch.cat([piece, footprint])[None]
    grid = F.affine_grid(theta[None], list(stacked.shape), align_corners=False)
    rotated = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    return rotated[:-1], (rotated[-1:] > 0.5).to(piece.dtype)


def _random_corner(height, width, size_h, size_w, allow_border, generator) -> tuple[int, int]:
    low_h, low_w = (-size_h + 1, -size_w + 1) if allow_border else (0, 0)
    high_h, high_w = (height - 1, width - 1) if allow_border else (height - size_h, width - size_w)
    top = int(torch.randint(low_h, high_h + 1, (), generator=generator))
    left = int(torch.randint(low_w, high_w + 1, (), generator=generator))
    return top, left


def _place(piece, footprint, top, left, height, width) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (or crop) the patch into an image-sized canvas; F.pad keeps the gradient to the patch."""
    size_h, size_w = piece.shape[1:]
    padding = (left, width - left - size_w, top, height - top - size_h)
    return F.pad(piece, padding), F.pad(footprint, padding)
