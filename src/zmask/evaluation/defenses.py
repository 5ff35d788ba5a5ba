"""The defenses compared by the evaluation, behind one contract (``zmask.contracts.Defense``) and
one registry, :data:`DEFENSES`, that the lineup, ``zmask evaluate --defenses`` and the reports read.

Adding a baseline is one file: a class with ``name``, ``masks``, ``detects``, a ``build(context)``
classmethod that fits it on a :class:`~zmask.contracts.FitContext`, and ``__call__(images)``
returning a :class:`~zmask.contracts.DefenseResult`, decorated with ``@DEFENSES.register()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..contracts import Defense, DefenseResult, FitContext, FittedDefense, ObservingDefense
from ..core.calibration import calibrate_threshold
from ..core.capture import deepest_layer, run_and_capture
from ..errors import ZMaskError
from ..registry import Registry
from .baselines import CoverageScore, HyperNeuronScore, LGSConfig, MaskNet, local_gradient_smoothing, train_masknet

DEFENSES: Registry[type[Defense]] = Registry("defense")


@DEFENSES.register()
class ZMaskDefense:
    """Z-Mask with Eq. 4 gating. ``mask`` is 1[M~ > 0.5] at input size for every image (the
    patch-mask IoU); ``masked_images`` is what the model saw (the dilated keep-mask applied)."""

    name: ClassVar[str] = "zmask"
    masks: ClassVar[bool] = True
    detects: ClassVar[bool] = True

    def __init__(self, defense: FittedDefense) -> None:
        self.defense = defense

    @classmethod
    def build(cls, context: FitContext) -> ZMaskDefense:
        return cls(context.zmask)

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        result = self.defense(images)
        analysis = result.detection
        shown = self.defense.apply_mask(images, analysis.keep_mask) if bool(analysis.flagged.any()) else images
        return DefenseResult(result.output, analysis.score, analysis.flagged, analysis.patch_mask, shown)


@DEFENSES.register()
class LGSDefense:
    """Local Gradient Smoothing (masking, no detection score)."""

    name: ClassVar[str] = "lgs"
    masks: ClassVar[bool] = True
    detects: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config: LGSConfig = LGSConfig()) -> None:
        self.model, self.config = model, config

    @classmethod
    def build(cls, context: FitContext) -> LGSDefense:
        return cls(context.model)

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        smoothed, gradient_mask = local_gradient_smoothing(images, self.config)
        return DefenseResult(self.model(smoothed), mask=(gradient_mask > 0).float(), masked_images=smoothed)


@DEFENSES.register()
class MaskNetDefense:
    """MaskNet: a U-Net trained on the fusion block's kind of data predicts the mask; its maximum
    probability is the score."""

    name: ClassVar[str] = "masknet"
    masks: ClassVar[bool] = True
    detects: ClassVar[bool] = False

    def __init__(self, model: nn.Module, masknet: MaskNet, fill: float = 0.0) -> None:
        self.model, self.masknet, self.fill = model, masknet, fill

    @classmethod
    def build(cls, context: FitContext) -> MaskNetDefense:
        if not context.labelled_batches:
            raise ZMaskError("MaskNet needs adversarial patches to train on: pass at least one patch")
        net = MaskNet(seed=context.seed)
        train_masknet(net, context.labelled_batches, epochs=context.options.get("masknet_epochs", 6), seed=context.seed,
                      progress=context.progress)
        return cls(context.model, net)

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        probability = torch.sigmoid(self.masknet(images))
        mask = (probability > 0.5).float()
        score = probability.flatten(1).amax(1)
        masked = images * (1 - mask) + self.fill * mask
        return DefenseResult(self.model(masked), score, None, mask, masked)


class ScoreDefense:
    """A detection-only baseline (HN, FPDA): the undefended output plus a score from one layer,
    thresholded by ROC on the patched training images like lambda0. It observes the undefended
    forward pass of :class:`NoDefense` instead of running one of its own. ``name`` is given per
    instance; the registered subclasses fix it as a class attribute (their registry key)."""

    name: str
    masks: ClassVar[bool] = False
    detects: ClassVar[bool] = True
    observes_undefended: ClassVar[bool] = True
    scorer_type: ClassVar[type] = HyperNeuronScore

    def __init__(self, name: str, model: nn.Module, scorer: Any, threshold: float | None = None) -> None:
        self.name, self.model, self.scorer, self.threshold = name, model, scorer, threshold

    @classmethod
    def build(cls, context: FitContext) -> ScoreDefense:
        layer = deepest_layer(context.model, context.zmask.config.deep_layers, context.clean_batches[0][:1])
        scorer = cls.scorer_type(context.model, layer).fit(context.clean_batches, context.progress)
        threshold = None
        if context.labelled_batches:
            scores = torch.cat([scorer.score(images) for images, _ in context.labelled_batches])
            patched = torch.cat([masks.flatten(1).amax(1) > 0 for _, masks in context.labelled_batches])
            if patched.any() and (~patched).any():
                threshold = calibrate_threshold(scores[~patched], scores[patched]).threshold
        return cls(cls.name, context.model, scorer, threshold)

    @property
    def layers(self) -> list[str]:
        return [self.scorer.layer]

    def observe(self, activations: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        score = self.scorer.score_activation(activations[self.scorer.layer].float())
        return score, (score > self.threshold if self.threshold is not None else None)

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        output, activations = run_and_capture(self.model, images, self.layers)
        score, flagged = self.observe(activations)
        return DefenseResult(output, score, flagged)


@DEFENSES.register()
class HyperNeuronDefense(ScoreDefense):
    """HN (HyperNeuron): neuron hyper-activation of the deepest D layer."""

    name = "hn"
    scorer_type: ClassVar[type] = HyperNeuronScore


@DEFENSES.register()
class CoverageDefense(ScoreDefense):
    """FPDA: out-of-range coverage of the deepest D layer."""

    name = "fpda"
    scorer_type: ClassVar[type] = CoverageScore


@DEFENSES.register()
class NoDefense:
    """The undefended model. Detection-only defenses passed as ``observers`` score the same forward
    pass, so they cost no extra inference."""

    name: ClassVar[str] = "none"
    masks: ClassVar[bool] = True
    detects: ClassVar[bool] = False

    def __init__(self, model: nn.Module, observers: Sequence[ObservingDefense] | None = None) -> None:
        self.model = model
        self.observers: list[ObservingDefense] = list(observers or [])

    @classmethod
    def build(cls, context: FitContext) -> NoDefense:
        return cls(context.model)

    def __call__(self, images: torch.Tensor) -> DefenseResult:
        if not self.observers:
            return DefenseResult(self.model(images))
        layers = list(dict.fromkeys(layer for observer in self.observers for layer in observer.layers))
        output, activations = run_and_capture(self.model, images, layers)
        return DefenseResult(output, extra={observer.name: observer.observe(activations) for observer in self.observers})


def report_rows(defense: Defense) -> list[str]:
    """The result rows one defense's evaluation produces: its own and those of the detectors
    observing its forward pass."""
    return [defense.name, *(observer.name for observer in getattr(defense, "observers", ()))]
