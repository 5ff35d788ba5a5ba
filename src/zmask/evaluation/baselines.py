"""Baseline defenses: LGS (masking), HN and FPDA (detection scores), MaskNet (learned masking).

HN and FPDA are re-implemented from their papers' descriptions, applied as the Z-Mask paper does
(on the deepest layer of the D set, thresholds from ROC analysis):

* HN (HyperNeuron, Co et al. 2021) scores neuron hyper-activation: per channel, the Z-score of the
  channel's spatial maximum against its clean distribution; the score is the mean positive part.
* FPDA (coverage analysis, Rossolini et al. 2022) scores out-of-range coverage: the fraction of
  activations above their channel's maximum over the clean set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.capture import ActivationCapture
from ..core.extremes import ExtremeAccumulator, LayerExtremes, hyper_activation
from ..errors import NotFittedError
from ..validation import batch_images


@dataclass(frozen=True)
class LGSConfig:
    """Local Gradient Smoothing (Naseer et al., WACV 2019) settings: the authors' defaults."""

    window: int = 15
    overlap: int = 5
    threshold: float = 0.1
    smoothing: float = 2.3


def local_gradient_smoothing(images: torch.Tensor, config: LGSConfig = LGSConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothed images, gradient mask) for B x 3 x H x W images in [0, 1].

    The normalised gradient magnitude is kept only in windows whose mean exceeds the threshold;
    pixels are scaled by 1 - clip(smoothing * kept gradient, 0, 1).
    """
    gray = images.mean(1, keepdim=True)
    dx = F.pad(gray[..., :, 1:] - gray[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(gray[..., 1:, :] - gray[..., :-1, :], (0, 0, 0, 1))
    magnitude = (dx**2 + dy**2).sqrt()
    magnitude = magnitude / magnitude.flatten(1).amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
    stride = config.window - config.overlap
    height, width = magnitude.shape[-2:]
    pad_h = (-(height - config.window)) % stride if height > config.window else config.window - height
    pad_w = (-(width - config.window)) % stride if width > config.window else config.window - width
    padded = F.pad(magnitude, (0, pad_w, 0, pad_h))
    selected = (F.avg_pool2d(padded, config.window, stride) > config.threshold).float()
    ones = torch.ones(1, 1, config.window, config.window, device=images.device, dtype=images.dtype)
    covered = F.conv_transpose2d(selected, ones, stride=stride)[..., :height, :width] > 0
    mask = magnitude * covered
    return images * (1 - (config.smoothing * mask).clamp(0, 1)), mask


class _LayerScore:
    """Shared fitting loop of the activation-based detectors: one layer, clean statistics."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.model, self.layer = model, layer

    def _activation(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), ActivationCapture(self.model, [self.layer]) as capture:
            self.model(images)
        return capture.require_all()[self.layer].float()

    def fit(self, data: Iterable[Any], progress: bool = False) -> _LayerScore:
        for batch in tqdm(data, desc=type(self).__name__, disable=not progress):
            self._update(self._activation(batch_images(batch)))
        self._finish()
        return self

    def score(self, images: torch.Tensor) -> torch.Tensor:
        return self.score_activation(self._activation(images))

    def _update(self, activation: torch.Tensor) -> None:
        """Add one clean batch's activations of the layer (B x C x h x w) to the statistics."""
        raise NotImplementedError

    def _finish(self) -> None:
        """Turn the accumulated statistics into the fitted ones."""
        raise NotImplementedError

    def score_activation(self, activation: torch.Tensor) -> torch.Tensor:
        """The score (B) of the layer's activations (B x C x h x w)."""
        raise NotImplementedError


class HyperNeuronScore(_LayerScore):
    """HN: mean positive Z-score of each channel's spatial maximum (clean mean/std of maxima),
    :func:`zmask.core.extremes.hyper_activation` on one layer."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__(model, layer)
        self._accumulator = ExtremeAccumulator()
        self.extremes: LayerExtremes | None = None

    def _update(self, activation: torch.Tensor) -> None:
        self._accumulator.update({self.layer: activation})

    def _finish(self) -> None:
        self.extremes = self._accumulator.compute()[self.layer]

    def score_activation(self, activation: torch.Tensor) -> torch.Tensor:
        if self.extremes is None:
            raise NotFittedError("HyperNeuronScore has no clean statistics: call fit(...) first")
        return hyper_activation(activation, self.extremes)


class CoverageScore(_LayerScore):
    """FPDA: fraction of activations above their channel's clean maximum."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__(model, layer)
        self.upper: torch.Tensor | None = None

    def _update(self, activation: torch.Tensor) -> None:
        batch_max = activation.transpose(0, 1).flatten(1).amax(1).cpu()
        self.upper = batch_max if self.upper is None else torch.maximum(self.upper, batch_max)

    def _finish(self) -> None:
        pass

    def score_activation(self, activation: torch.Tensor) -> torch.Tensor:
        if self.upper is None:
            raise NotFittedError("CoverageScore has no clean maxima: call fit(...) on at least one batch first")
        above = activation > self.upper.to(activation).view(1, -1, 1, 1)
        return above.flatten(1).float().mean(1)


class MaskNet(nn.Module):
    """A small U-Net predicting the patch mask (logits at input resolution), after Chiang et al. 2021.
    Its initial weights depend only on ``seed``."""

    def __init__(self, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._build(width)

    def _build(self, width: int) -> None:

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.down1, self.down2, self.down3 = block(3, width), block(width, 2 * width), block(2 * width, 4 * width)
        self.up2, self.up1 = block(6 * width, 2 * width), block(3 * width, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        d1 = self.down1(images)
        d2 = self.down2(F.max_pool2d(d1, 2))
        d3 = self.down3(F.max_pool2d(d2, 2))
        u2 = self.up2(torch.cat([F.interpolate(d3, size=d2.shape[-2:], mode="bilinear", align_corners=False), d2], 1))
        u1 = self.up1(torch.cat([F.interpolate(u2, size=d1.shape[-2:], mode="bilinear", align_corners=False), d1], 1))
        return self.head(u1)


def train_masknet(
    masknet: MaskNet, data: Iterable[Any], epochs: int = 5, learning_rate: float = 1e-3, seed: int = 0, progress: bool = False
) -> list[float]:
    """Fit MaskNet with pixel-wise BCE on (images, patch_masks) batches (the fusion block's data)."""
    from ..validation import batch_images_and_masks

    optimizer = torch.optim.Adam(masknet.parameters(), lr=learning_rate)
    history = []
    masknet.train()
    batches = list(data)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="masknet", disable=not progress):
        total, count = 0.0, 0
        for position in torch.randperm(len(batches), generator=generator).tolist():
            images, masks = batch_images_and_masks(batches[position])
            logits = masknet(images)
            loss = F.binary_cross_entropy_with_logits(logits, masks.float().reshape(logits.shape))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(images), count + len(images)
        history.append(total / max(count, 1))
    masknet.eval()
    return history
