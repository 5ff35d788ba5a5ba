"""A common interface for Z-Mask and the baselines: output, detection score and predicted mask."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    mask: predicted patch pixels (B x 1 x H x W, 1 = masked) or None; extra: results of detectors
    that observed the same forward pass (name -> (score, flagged))."""

    output: Any
    score: torch.Tensor | None = None
    flagged: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    extra: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


class NoDefense:
    """The undefended model. Detection-only baselines (HN, FPDA) passed as ``observers`` score the
    same forward pass, so they cost no extra inference."""

    name = "none"

    def __init__(self, model: nn.Module, observers: list[ScoreDefense] | None = None) -> None:
        self.model, self.observers = model, list(observers or [])

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        if not self.observers:
            return DefenseResult(self.model(images))
        layers = list(dict.fromkeys(o.scorer.layer for o in self.observers))
        with ActivationCapture(self.model, layers) as capture:
            output = self.model(images)
        activations = capture.require_all()
        extra = {}
        for observer in self.observers:
            score = observer.scorer.score_activation(activations[observer.scorer.layer].float())
            extra[observer.name] = (score, score > observer.threshold if observer.threshold is not None else None)
        return DefenseResult(output, extra=extra)


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
