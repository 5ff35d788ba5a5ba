"""zmask: Z-Mask (Rossolini et al., AAAI 2023) against physically-realizable adversarial patches.

Wrap a convolutional network, fit clean statistics, train the 8-parameter fusion block, calibrate
the threshold, then use the defended model like the original::

    from zmask import ZMask, ZMaskConfig
    defense = ZMask(model, ZMaskConfig(shallow_layers=[...], deep_layers=[...]))
    defense.fit_statistics(clean_loader)
    defense.fit_fusion(patched_loader)      # (images, patch_masks) batches
    defense.calibrate(calibration_loader)   # lambda0 by ROC
    result = defense(images)                # .output, .detection.flagged, .detection.keep_mask

The library never imports the command line (``zmask.cli``), and importing it loads neither
scikit-learn nor matplotlib nor pycocotools.
"""

from ._version import __version__
from .config import ZMaskConfig, scale_kernels
from .core.analysis import Analysis, Heatmaps
from .core.calibration import Calibration, calibrate_threshold
from .core.capture import ActivationCapture, capture_activations
from .core.fusion import FusionBlock, FusionTraining, detection_score
from .core.statistics import LayerStatistics, StatisticsAccumulator
from .defense import DefenseOutput, Detection, ZMask
from .errors import AssetError, ConfigError, InputError, NotFittedError, ProfileError, ZMaskError, ZMaskTypeError

__all__ = [
    "ActivationCapture",
    "Analysis",
    "AssetError",
    "Calibration",
    "ConfigError",
    "DefenseOutput",
    "Detection",
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
    "scale_kernels",
    "__version__",
]
