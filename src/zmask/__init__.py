"""zmask: Z-Mask (Rossolini et al., AAAI 2023) against physically-realizable adversarial patches.

Wrap a convolutional network, fit clean statistics, train the 8-parameter fusion block, calibrate
the threshold, then use the defended model like the original::

    from zmask import ZMask, ZMaskConfig
    defense = ZMask(model, ZMaskConfig(shallow_layers=[...], deep_layers=[...]))
    defense.fit_statistics(clean_loader)
    defense.fit_fusion(patched_loader)      # (images, patch_masks) batches
    defense.calibrate(calibration_loader)   # lambda0 by ROC
    result = defense(images)                # .output, .detection.flagged, .detection.keep_mask
"""

__version__ = "0.1.0"

from .config import ZMaskConfig, scale_kernels  # noqa: E402
from .core.calibration import Calibration, calibrate_threshold  # noqa: E402
from .core.capture import ActivationCapture, capture_activations  # noqa: E402
from .core.fusion import FusionBlock, FusionTraining, detection_score  # noqa: E402
from .core.statistics import LayerStatistics, StatisticsAccumulator  # noqa: E402
from .defense import DefenseOutput, Detection, Heatmaps, ZMask  # noqa: E402
from .errors import AssetError, NotFittedError, ProfileError, ZMaskError  # noqa: E402

__all__ = [
    "ActivationCapture",
    "AssetError",
    "Calibration",
    "DefenseOutput",
    "Detection",
    "FusionBlock",
    "FusionTraining",
    "Heatmaps",
    "LayerStatistics",
    "NotFittedError",
    "ProfileError",
    "StatisticsAccumulator",
    "ZMask",
    "ZMaskConfig",
    "ZMaskError",
    "calibrate_threshold",
    "capture_activations",
    "detection_score",
    "scale_kernels",
    "__version__",
]
