"""A common interface for Z-Mask and the baselines: output, detection score and predicted mask."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.capture import ActivationCapture
from ..defense import ZMask
from .baselines import LGSConfig, MaskNet, local_gradient_smoothing


@dataclass
class DefenseResult:
    """output: the task output; score: detection score (B) or None; flagged: B bools or None;
    mask: predicted patch pixels (B x 1 x H x W, 1 = masked) or None."""

    output: Any
    score: torch.Tensor | None = None
    flagged: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class NoDefense:
    name = "none"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        return DefenseResult(self.model(images))


class ZMaskDefense:
    """Z-Mask with Eq. 4 gating; its mask is 1[M~ > 0.5] at input size (reported even when not flagged)."""

    name = "zmask"

    def __init__(self, defense: ZMask) -> None:
        self.defense = defense

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        result = self.defense(images)
        mask = F.interpolate((result.detection.soft_mask > self.defense.config.mask_threshold).float(), size=images.shape[-2:], mode="nearest")
        return DefenseResult(result.output, result.detection.score, result.detection.flagged, mask)


class LGSDefense:
    name = "lgs"

    def __init__(self, model: nn.Module, config: LGSConfig = LGSConfig()) -> None:
        self.model, self.config = model, config

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        smoothed, gradient_mask = local_gradient_smoothing(images, self.config)
        return DefenseResult(self.model(smoothed), mask=(gradient_mask > 0).float())


class MaskNetDefense:
    name = "masknet"

    def __init__(self, model: nn.Module, masknet: MaskNet, fill: float = 0.0) -> None:
        self.model, self.masknet, self.fill = model, masknet, fill

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        probability = torch.sigmoid(self.masknet(images))
        mask = (probability > 0.5).float()
        score = probability.flatten(1).amax(1)
        return DefenseResult(self.model(images * (1 - mask) + self.fill * mask), score, None, mask)


class ScoreDefense:
    """A detection-only baseline (HN, FPDA): the undefended output plus a score from one layer."""

    def __init__(self, name: str, model: nn.Module, scorer: Any, threshold: float | None = None) -> None:
        self.name, self.model, self.scorer, self.threshold = name, model, scorer, threshold

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        with ActivationCapture(self.model, [self.scorer.layer]) as capture:
            output = self.model(images)
        score = self.scorer.score_activation(capture.require_all()[self.scorer.layer].float())
        flagged = score > self.threshold if self.threshold is not None else None
        return DefenseResult(output, score, flagged)
