"""Loss terms of the patch attacks (spec sections 4.2-4.5); the task losses live with their tasks
(``zmask.tasks``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.statistics import LayerStatistics, zscore_grid
from ..errors import InputError


def smoothness(patch: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences between neighbouring pixels (to be minimised)."""
    return ((patch[:, 1:, :] - patch[:, :-1, :]) ** 2).sum() + ((patch[:, :, 1:] - patch[:, :, :-1]) ** 2).sum()


def non_printability(patch: torch.Tensor, printable: torch.Tensor) -> torch.Tensor:
    """Sharif et al.'s NPS: per pixel, the product of distances to the printable colours (P x 3)."""
    distances = (patch.permute(1, 2, 0)[:, :, None, :] - printable.to(patch)).norm(dim=-1)
    return distances.prod(-1).sum()


def default_printable_colours(levels: int = 5) -> torch.Tensor:
    """A regular grid of colours as a stand-in printer gamut (levels^3 x 3)."""
    axis = torch.linspace(0.05, 0.95, levels)
    return torch.cartesian_prod(axis, axis, axis)


def over_activation_loss(
    activations: dict[str, torch.Tensor],
    statistics: dict[str, LayerStatistics],
    patch_masks: torch.Tensor,
    heatmap_size: tuple[int, int],
    eps: float = 1e-5,
    std_floor: float = 0.0,
) -> torch.Tensor:
    """L_OZ of Eq. 5 (spec 4.4): per layer of S and channel, |sum of Z-scores inside the patch|,
    averaged over channels and layers and divided by the patch area (all at heatmap size)."""
    masks = F.interpolate(patch_masks.float(), size=heatmap_size, mode="nearest")
    area = masks.flatten(1).sum(1).clamp(min=1)
    total: torch.Tensor | None = None
    for name, activation in activations.items():
        zscore = zscore_grid(activation, statistics[name], heatmap_size, eps, std_floor)
        inside = (zscore * masks).flatten(2).sum(2).abs()  # B x C
        term = inside.mean(1) / area
        total = term if total is None else total + term
    if total is None:
        raise InputError("L_OZ needs the activations of at least one layer")
    return (total / len(activations)).mean()
