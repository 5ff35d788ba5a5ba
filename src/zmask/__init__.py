"""zmask: Z-Mask (Rossolini et al., AAAI 2023) against physically-realizable adversarial patches.

Wrap a convolutional network, fit clean statistics, train the 8-parameter fusion block, calibrate
the threshold, then use the defended model like the original::

    from zmask import ZMask, ZMaskConfig
    defense = ZMask(model, ZMaskConfig(shallow_layers=[...], deep_layers=[...]))
    defense.fit_statistics(clean_loader)
    defense.fit_fusion(patched_loader)      # (images, patch_masks) batches
    defense.calibrate(calibration_loader)   # lambda0 by ROC
    result = defense(images)                # .output, .detection.flagged, .detection.keep_mask
    analysis = defense.detect(images)       # the analysis alone: .score, .flagged, .heatmaps, .patch_mask

Everything fitted lives in ``defense.state`` (:class:`FittedState`), which profiles save and load.

The library never imports the command line (``zmask.cli``), and importing it loads neither
scikit-learn nor matplotlib nor pycocotools.
"""

from typing import TYPE_CHECKING

from ._version import __version__
from .errors import AssetError, ConfigError, InputError, NotFittedError, ProfileError, ZMaskError, ZMaskTypeError

# The public names below are imported on first use (PEP 562), so that ``import zmask.errors`` or the
# command line's argument parsing does not load torch; ``from zmask import ZMask`` works as before.
_LAZY = {
    "ZMaskConfig": ".config", "scale_kernels": ".config",
    "Analysis": ".core.analysis", "Heatmaps": ".core.analysis",
    "Calibration": ".core.calibration", "calibrate_threshold": ".core.calibration", "roc_auc": ".core.calibration",
    "ActivationCapture": ".core.capture", "capture_activations": ".core.capture",
    "FusionBlock": ".core.fusion", "FusionTraining": ".core.fusion", "detection_score": ".core.fusion",
    "LayerStatistics": ".core.statistics", "StatisticsAccumulator": ".core.statistics",
    "FittedState": ".core.state",
    "DefenseOutput": ".defense", "Detection": ".defense", "ZMask": ".defense",
}

if TYPE_CHECKING:
    from .config import ZMaskConfig, scale_kernels
    from .core.analysis import Analysis, Heatmaps
    from .core.calibration import Calibration, calibrate_threshold, roc_auc
    from .core.capture import ActivationCapture, capture_activations
    from .core.fusion import FusionBlock, FusionTraining, detection_score
    from .core.state import FittedState
    from .core.statistics import LayerStatistics, StatisticsAccumulator
    from .defense import DefenseOutput, Detection, ZMask


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zmask' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ActivationCapture",
    "Analysis",
    "AssetError",
    "Calibration",
    "ConfigError",
    "DefenseOutput",
    "Detection",
    "FittedState",
    "FusionBlock",
    "FusionTraining",
    "Heatmaps",
    "InputError",
    "LayerStatistics",
    "NotFittedError",
    "ProfileError",
    "StatisticsAccumulator",
    "ZMask",
    "ZMaskConfig",
    "ZMaskError",
    "ZMaskTypeError",
    "calibrate_threshold",
    "capture_activations",
    "detection_score",
    "roc_auc",
    "scale_kernels",
    "__version__",
]
