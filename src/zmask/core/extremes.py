"""Channel-extreme evidence: the per-channel maxima of the layers Z-Mask already reads.

An attack can push the spatial Z-score heatmaps down inside its patch (activation suppression)
and still drive a few channels far above anything seen on clean images; HN-style detectors
(hyper-activated neurons) see that in the same forward pass. This module holds the pure pieces:

* :class:`ExtremeAccumulator` - clean statistics of each channel's spatial maximum (mean, std,
  and the largest value seen), mergeable across ranks;
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
    """Streaming sums of per-image channel maxima (float64), their squares, and their maximum."""

    images: int = 0
    _state: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def update(self, activations: Mapping[str, torch.Tensor]) -> None:
        batch = 0
        for name, activation in activations.items():
            maxima = channel_maxima(activation.detach()).double().cpu()
            batch = maxima.shape[0]
            values = [maxima.sum(0), (maxima**2).sum(0), maxima.amax(0)]
            previous = self._state.get(name)
            if previous is not None and previous[0].shape != values[0].shape:
                raise InputError(f"layer {name!r} changed its channel count from {previous[0].shape[0]} to {values[0].shape[0]}")
            self._state[name] = values if previous is None else [previous[0] + values[0], previous[1] + values[1],
                                                                 torch.maximum(previous[2], values[2])]
        self.images += batch

    def all_reduce(self) -> None:
        """Merge the accumulators of all ``torch.distributed`` ranks (no-op when single-process)."""
        from ..distributed import all_gather_objects, rank_and_world

        rank, world = rank_and_world()
        if world == 1:
            return
        states = sorted(all_gather_objects([(rank, self.images, self._state)]), key=lambda state: state[0])
        merged = ExtremeAccumulator()
        for _, images, state in states:
            for name, values in state.items():
                mine = merged._state.get(name)
                merged._state[name] = [v.clone() for v in values] if mine is None else [mine[0] + values[0], mine[1] + values[1],
                                                                                        torch.maximum(mine[2], values[2])]
            merged.images += images
        self.images, self._state = merged.images, merged._state

    def compute(self) -> dict[str, LayerExtremes]:
        if self.images == 0:
            raise InputError("no clean images were seen: channel-extreme statistics need at least one batch")
        result = {}
        for name, (total, squares, upper) in self._state.items():
            mean = total / self.images
            variance = (squares - self.images * mean**2) / max(self.images - 1, 1)
            std = variance.clamp(min=0).sqrt() if self.images > 1 else torch.ones_like(mean)
            result[name] = LayerExtremes(mean.float(), std.float().clamp(min=1e-6), upper.float())
        return result


def extreme_score(activations: Mapping[str, torch.Tensor], extremes: Mapping[str, LayerExtremes]) -> torch.Tensor:
    """Per image (B): max over layers of mean_c relu((max_hw a_c - mu_c) / sigma_c)."""
    scores = []
    for name, stats in extremes.items():
        maxima = channel_maxima(activations[name])
        scores.append(((maxima - stats.mean.to(maxima)) / stats.std.to(maxima)).clamp(min=0).mean(1))
    return torch.stack(scores).amax(0)


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
