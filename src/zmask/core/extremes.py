"""Channel-extreme evidence: the per-channel maxima of the layers Z-Mask already reads.

An attack can push the spatial Z-score heatmaps down inside its patch (activation suppression)
and still drive a few channels far above anything seen on clean images; HN-style detectors
(hyper-activated neurons) see that in the same forward pass. This module holds the pure pieces:

* :class:`ExtremeAccumulator` - clean statistics of each channel's spatial maximum (mean, std,
  and the largest value seen), mergeable across ranks; also what the HN baseline fits;
* :func:`extreme_score` - per image, the mean over channels of the positive Z-score of the
  channel's maximum, maximised over the layers (a second detection score);
* :func:`coverage_map` - per pixel, whether any channel exceeds its clean maximum there (where
  to mask when only this evidence fires).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import InputError


@dataclass
class LayerExtremes:
    """Clean statistics of one layer's channel maxima (each of shape C, float32)."""

    mean: torch.Tensor
    std: torch.Tensor
    upper: torch.Tensor

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def to(self, device: torch.device | str) -> LayerExtremes:
        return LayerExtremes(self.mean.to(device), self.std.to(device), self.upper.to(device))


def channel_maxima(activation: torch.Tensor) -> torch.Tensor:
    """B x C: each channel's spatial maximum (differentiable, for attacks that target it)."""
    return activation.flatten(2).amax(2).float()


@dataclass
class ExtremeAccumulator:
    """Per-image channel maxima of each layer (float64, C values per image), kept so that the
    statistics are exact whatever the number of images."""

    images: int = 0
    _maxima: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def update(self, activations: Mapping[str, torch.Tensor]) -> None:
        batch = 0
        for name, activation in activations.items():
            maxima = channel_maxima(activation.detach()).double().cpu()
            batch = maxima.shape[0]
            previous = self._maxima.setdefault(name, [])
            if previous and previous[0].shape[1] != maxima.shape[1]:
                raise InputError(f"layer {name!r} changed its channel count from {previous[0].shape[1]} to {maxima.shape[1]}")
            previous.append(maxima)
        self.images += batch

    def all_reduce(self) -> None:
        """Merge the accumulators of all ``torch.distributed`` ranks (no-op when single-process)."""
        from ..distributed import all_gather_objects, rank_and_world

        rank, world = rank_and_world()
        if world == 1:
            return
        states = sorted(all_gather_objects([(rank, self.images, self._maxima)]), key=lambda state: state[0])
        merged: dict[str, list[torch.Tensor]] = {}
        for _, _, maxima in states:
            for name, values in maxima.items():
                merged.setdefault(name, []).extend(values)
        self.images, self._maxima = sum(images for _, images, _ in states), merged

    def compute(self) -> dict[str, LayerExtremes]:
        if self.images == 0:
            raise InputError("no clean images were seen: channel-extreme statistics need at least one batch")
        result = {}
        for name, values in self._maxima.items():
            maxima = torch.cat(values)
            std = maxima.std(0).float().clamp(min=1e-6) if len(maxima) > 1 else torch.ones(maxima.shape[1])
            result[name] = LayerExtremes(maxima.mean(0).float(), std, maxima.amax(0).float())
        return result


def hyper_activation(activation: torch.Tensor, stats: LayerExtremes) -> torch.Tensor:
    """Per image (B): mean_c relu((max_hw a_c - mu_c) / sigma_c), the HyperNeuron score of one layer."""
    maxima = channel_maxima(activation)
    return ((maxima - stats.mean.to(maxima)) / stats.std.to(maxima)).clamp(min=0).mean(1)


def extreme_score(activations: Mapping[str, torch.Tensor], extremes: Mapping[str, LayerExtremes]) -> torch.Tensor:
    """Per image (B): the maximum over layers of :func:`hyper_activation`."""
    return torch.stack([hyper_activation(activations[name], stats) for name, stats in extremes.items()]).amax(0)


def coverage_map(activations: Mapping[str, torch.Tensor], extremes: Mapping[str, LayerExtremes]) -> torch.Tensor:
    """B x 1 x h x w binary: 1 where some channel of some layer exceeds its clean maximum, at the
    resolution of the finest of the layers (coarser ones nearest-upsampled to it)."""
    import torch.nn.functional as F

    maps = []
    for name, stats in extremes.items():
        activation = activations[name].detach().float()
        maps.append((activation > stats.upper.to(activation).view(1, -1, 1, 1)).any(1, keepdim=True).float())
    size = max((tuple(m.shape[-2:]) for m in maps), key=lambda hw: hw[0] * hw[1])
    return torch.stack([F.interpolate(m, size=size, mode="nearest") for m in maps]).amax(0)
