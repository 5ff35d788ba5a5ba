"""Z-Mask inside the Adversarial Robustness Toolbox (ART): a preprocessor defence and an evasion detector.

* :class:`ZMaskPreprocessor` is an ART ``PreprocessorPyTorch``: pass it as
  ``preprocessing_defences=[...]`` of an ART PyTorch estimator and every prediction (and every
  gradient an ART attack asks for) goes through Z-Mask's detect-and-mask (Eq. 4).
* :class:`ZMaskDetector` is an ART evasion detector: ``detect(x) -> (report, is_adversarial)``, and
  ``fit(x, patches=...)`` fits the profile (statistics, fusion block, lambda0) with
  :func:`zmask.evaluation.fit_zmask`.

Both wrap a :class:`zmask.ZMask` whose model takes the estimator's inputs as they arrive, before
ART's own ``preprocessing=(mean, std)`` (ART applies defences first): images in [0, 1], N x C x H x W,
or N x H x W x C with ``channels_first=False``.

This module imports ART when it is imported (``import zmask`` never does); without ART it raises
:class:`ARTMissingError` (a :class:`zmask.ZMaskError` and an ``ImportError``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.masking import straight_through_keep_mask
from ..defense import ZMask
from ..errors import ConfigError, NotFittedError, ZMaskError, ZMaskTypeError
from ..evaluation.fitting import FitPlan, fit_zmask
from ..validation import check_images


class ARTMissingError(ZMaskError, ImportError):
    """The Adversarial Robustness Toolbox is not installed."""


try:
    import art as _art
except ImportError as error:  # pragma: no cover - exercised only where ART is absent
    raise ARTMissingError(
        f"zmask.integrations.art needs the Adversarial Robustness Toolbox ({error}); install it with "
        "pip install 'zmask[art]' (or pip install adversarial-robustness-toolbox)"
    ) from None
try:
    from art.defences.detector.evasion.evasion_detector import EvasionDetector
    from art.defences.preprocessor.preprocessor import PreprocessorPyTorch
except ImportError as error:  # pragma: no cover - an ART too old or too new for this bridge
    raise ARTMissingError(
        f"adversarial-robustness-toolbox {getattr(_art, '__version__', '?')} lacks the interfaces zmask uses ({error}); "
        "install a supported version with pip install 'zmask[art]'"
    ) from None

__all__ = ["ARTMissingError", "ZMaskDetector", "ZMaskPreprocessor"]

logger = logging.getLogger(__name__)

Gradient = Literal["straight_through", "identity"]
_GRADIENTS = ("straight_through", "identity")


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's weights live and their floating dtype (inputs are moved there)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the analysis in eval mode (the mode the statistics were fitted in): ART's object detectors
    switch their model to train mode to get losses and leave it so. Every module's own mode is
    restored afterwards, since ART may have switched only an inner model."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _check_defense(defense: Any) -> ZMask:
    if not isinstance(defense, ZMask):
        raise ZMaskTypeError(f"defense must be a zmask.ZMask, got {type(defense).__name__}")
    return defense


class ZMaskPreprocessor(PreprocessorPyTorch):
    """Z-Mask's detect-and-mask as an ART preprocessor defence (``forward(x, y) -> (x_masked, y)``).

    Forward: the defense analyses ``x`` (one forward pass of its model reading the configured
    layers) and returns ``x * M + fill * (1 - M)`` with Eq. 4's keep-mask ``M`` (1 = keep; all ones
    for images that are not flagged), exactly the images :class:`zmask.ZMask` re-processes.
    ``y`` is returned unchanged.

    Backward (``gradient="straight_through"``, the default): both thresholds of Eq. 4 are replaced by
    straight-through estimates, so that gradient-based (BPDA-style) ART attacks see the defense.
    This is the same keep-mask the project's own end-to-end attack differentiates,
    :func:`zmask.core.masking.straight_through_keep_mask`: the upsampled soft mask ``M~`` stands for
    ``1[M~ > t]`` and ``sigmoid(d - lambda0)`` for the flag ``1[d > lambda0]`` (with the
    channel-extreme evidence, "either score fires"); with ``gate=False`` every image is masked and
    the flag has no gradient. The forward values are never changed by the estimate.
    ``gradient="identity"`` is ART's default BPDA instead: ``d(x_masked)/dx = I``.

    The analysis runs with the model in eval mode (each module's mode is given back). ``gate=False``
    masks every image (the authors' demo); ``apply_fit`` (default off) also masks the images of an
    ART ``fit``; ``apply_predict`` masks at prediction and attack time.
    """

    params = ["channels_first", "gradient", "gate"]

    def __init__(self, defense: ZMask, channels_first: bool = True, gradient: Gradient = "straight_through", gate: bool = True,
                 apply_fit: bool = False, apply_predict: bool = True) -> None:
        self.defense = _check_defense(defense)
        device, _ = _module_device_dtype(defense.model)
        super().__init__(device_type="cpu" if device.type == "cpu" else "gpu", is_fitted=True, apply_fit=apply_fit,
                         apply_predict=apply_predict)
        self.channels_first = channels_first
        self.gradient = gradient
        self.gate = gate
        self._check_params()

    def _check_params(self) -> None:
        if self.gradient not in _GRADIENTS:
            raise ConfigError(f"gradient={self.gradient!r} is not one of {_GRADIENTS}")
        if not isinstance(self.channels_first, bool) or not isinstance(self.gate, bool):
            raise ZMaskTypeError("channels_first and gate must be booleans")

    def forward(self, x: torch.Tensor, y: Any = None) -> tuple[torch.Tensor, Any]:
        """(masked images in the layout and dtype of ``x``, ``y`` unchanged); differentiable (see the class)."""
        if not isinstance(x, torch.Tensor):
            raise ZMaskTypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 4 and not self.channels_first:
            x_nchw = x.permute(0, 3, 1, 2)
        else:
            x_nchw = x
        device, dtype = _module_device_dtype(self.defense.model)
        images = check_images(x_nchw, self.defense.config.in_channels, "x").to(device=device, dtype=dtype)
        with _eval_mode(self.defense.model):
            _, activations = self.defense.capture(images)
        analysis = self.defense.analyze(activations, (int(images.shape[-2]), int(images.shape[-1])), self.gate)
        if self.gradient == "straight_through" and torch.is_grad_enabled() and images.requires_grad:
            state = self.defense.state
            keep = straight_through_keep_mask(analysis, state.threshold, self.gate, state.extreme_threshold)
        else:
            keep = analysis.keep_mask
        masked = self.defense.apply_mask(images, keep)
        if self.gradient == "identity":
            masked = images + (masked - images).detach()
        masked = masked.to(dtype=x.dtype, device=x.device)
        return (masked if self.channels_first else masked.permute(0, 2, 3, 1)), y


class _Images(Dataset):
    """Items ``{"image": 3 x H x W}`` of an N x C x H x W tensor (the form fit_zmask reads)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index]}


class ZMaskDetector(EvasionDetector):
    """Z-Mask as an ART evasion detector: is each image patched, and where is the patch.

    ``detect(x)`` returns ``(report, is_adversarial)``: ``report["score"]`` the detection score d
    per image, ``report["threshold"]`` lambda0, ``report["patch_mask"]`` the binary patch mask at
    input size (N x H x W bool, every image); ``is_adversarial`` is ``d > lambda0``.
    """

    defence_params = ["channels_first"]

    def __init__(self, defense: ZMask, channels_first: bool = True) -> None:
        super().__init__()
        self.defense = _check_defense(defense)
        self.channels_first = channels_first
        self.fit_report: dict[str, Any] | None = None

    def _images(self, x: Any) -> torch.Tensor:
        device, dtype = _module_device_dtype(self.defense.model)
        images = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if images.dim() == 4 and not self.channels_first:
            images = images.permute(0, 3, 1, 2)
        return check_images(images, self.defense.config.in_channels, "x").to(device=device, dtype=dtype)

    def fit(self, x: Any, y: Any = None, batch_size: int = 8, nb_epochs: int | None = None,
            patches: Sequence[Any] | None = None, plan: FitPlan | None = None, progress: bool = False, **kwargs: Any) -> None:
        """Fit the profile on clean images ``x`` with :func:`zmask.evaluation.fit_zmask`.

        ``x`` is split into statistics, fusion and calibration images (``plan``; by default 3/8, 3/8
        and 1/4 of ``x``); the fusion and calibration images are pasted with ``patches`` (C x h x w
        in [0, 1], e.g. ``zmask.attacks.random_noise_patch`` or a patch from an ART attack) at
        random places, half of them left clean. ``y`` is not used (Z-Mask needs no labels);
        ``nb_epochs`` replaces the fusion block's epochs and ``batch_size`` the plan's batch size.
        The defense is replaced by the fitted one; ``fit_report`` records the split and lambda0.
        The model runs in eval mode throughout; each module's mode is restored afterwards.
        """
        if kwargs:
            raise ConfigError(f"unknown fit options {sorted(kwargs)}")
        if not patches:
            raise ConfigError("ZMaskDetector.fit needs patches=[...] (C x h x w in [0, 1]) to train the fusion block and calibrate lambda0")
        images = self._images(x)
        patch_tensors = [torch.as_tensor(np.asarray(p) if not isinstance(p, torch.Tensor) else p).to(images) for p in patches]
        if plan is None:
            count = images.shape[0]
            statistics = (3 * count) // 8
            fusion = (3 * count) // 8
            plan = FitPlan(statistics_images=statistics, fusion_images=fusion, calibration_images=count - statistics - fusion)
        plan = dataclasses.replace(plan, batch_size=batch_size)
        if nb_epochs is not None:
            plan = dataclasses.replace(plan, fusion=dataclasses.replace(plan.fusion, epochs=nb_epochs))
        with _eval_mode(self.defense.model):
            self.defense, self.fit_report = fit_zmask(self.defense.model, self.defense.config, _Images(images), patch_tensors, plan, progress)
        logger.info("ZMaskDetector fitted on %d images: lambda0 = %.6g", images.shape[0], self.defense.state.threshold)

    def detect(self, x: Any, batch_size: int = 128, **kwargs: Any) -> tuple[dict[str, Any], np.ndarray]:
        """(report with scores, threshold and patch masks; ``d > lambda0`` per image as a bool array)."""
        if kwargs:
            raise ConfigError(f"unknown detect options {sorted(kwargs)}")
        if self.defense.state.threshold is None:
            raise NotFittedError("the detector is not fitted: call fit(x, patches=...) or wrap a ZMask loaded from a profile")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        images = self._images(x)
        scores, flags, masks = [], [], []
        with torch.no_grad(), _eval_mode(self.defense.model):
            for start in range(0, images.shape[0], batch_size):
                analysis = self.defense.detect(images[start : start + batch_size])
                scores.append(analysis.score.float().cpu())
                flags.append(analysis.flagged.cpu())
                masks.append(analysis.patch_mask[:, 0].bool().cpu())
        report = {"score": torch.cat(scores).numpy(), "threshold": float(self.defense.state.threshold), "patch_mask": torch.cat(masks).numpy()}
        return report, torch.cat(flags).numpy()
