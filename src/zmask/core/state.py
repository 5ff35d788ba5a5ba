"""The fitted state of a Z-Mask defense, as one typed object.

:class:`FittedState` is everything ``fit`` learns and a profile stores: the clean statistics of
each layer, the channel-extreme statistics, the fusion block, lambda0 and the extreme threshold
with the operating points they were calibrated at, the fitted input size and how it was fitted.
:class:`zmask.ZMask` holds one, :mod:`zmask.core.profile` saves and loads it, and
:func:`zmask.core.analysis.analyze` reads it. It is an ``nn.Module`` so that ``defense.to(device)``
moves the fusion block with the model; the statistics stay float32 whatever the model's dtype and
follow the activations' device (:meth:`on_device`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..validation import check_threshold
from .calibration import Calibration
from .extremes import LayerExtremes
from .fusion import FusionBlock
from .statistics import LayerStatistics


class FittedState(nn.Module):
    """Statistics, extremes, fusion block, thresholds and calibrations of one fitted defense.

    ``statistics``: layer name -> :class:`LayerStatistics` (None until fitted); ``fusion``: the
    8-parameter :class:`FusionBlock`; ``threshold``: lambda0, ``score > threshold`` flags (None
    until calibrated; checked when set); ``calibration``: the operating point lambda0 was chosen
    at; ``calibration_mask_iou``: mean patch-mask IoU on the patched calibration images;
    ``extremes`` / ``extreme_threshold`` / ``extreme_calibration``: the same for the channel-extreme
    evidence (``ZMaskConfig.extreme_layers``); ``input_size``: (H, W) the statistics were fitted at;
    ``provenance``: a JSON-able record of how it was fitted.
    """

    fusion: FusionBlock

    def __init__(
        self,
        statistics: dict[str, LayerStatistics] | None = None,
        fusion: FusionBlock | None = None,
        threshold: float | None = None,
        calibration: Calibration | None = None,
        calibration_mask_iou: float | None = None,
        extremes: dict[str, LayerExtremes] | None = None,
        extreme_threshold: float | None = None,
        extreme_calibration: Calibration | None = None,
        input_size: tuple[int, int] | None = None,
        provenance: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.fusion = fusion if fusion is not None else FusionBlock()
        self.statistics = statistics
        self.threshold = threshold
        self.calibration = calibration
        self.calibration_mask_iou = calibration_mask_iou
        self.extremes = extremes
        self.extreme_threshold = extreme_threshold
        self.extreme_calibration = extreme_calibration
        self.input_size = input_size
        self.provenance = provenance

    @property
    def threshold(self) -> float | None:
        """lambda0: ``score > threshold`` flags an image (None until calibrated); checked when set."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: Any) -> None:
        self._threshold = check_threshold(value)

    @property
    def extreme_threshold(self) -> float | None:
        """The channel-extreme score's own threshold (None: that evidence does not flag); checked when set."""
        return self._extreme_threshold

    @extreme_threshold.setter
    def extreme_threshold(self, value: Any) -> None:
        self._extreme_threshold = check_threshold(value, "extreme_threshold")

    def on_device(self, device: torch.device) -> FittedState:
        """This state with its statistics and extremes on ``device`` (moved in place, once per device change)."""
        statistics, extremes = self.statistics, self.extremes
        if statistics and next(iter(statistics.values())).mean.device != device:
            for name, layer in statistics.items():
                statistics[name] = layer.to(device)
        if extremes and next(iter(extremes.values())).mean.device != device:
            for name, maxima in extremes.items():
                extremes[name] = maxima.to(device)
        return self

    def extra_repr(self) -> str:
        layers = list(self.statistics) if self.statistics else None
        return f"layers={layers}, threshold={self.threshold}, input_size={self.input_size}"
