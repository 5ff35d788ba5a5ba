"""The Z-Mask math as pure tensor functions (the kornia pattern: functions here, modules elsewhere).

Each concept is implemented once, in the core module named beside it, and collected here:

* :func:`zscore`, :func:`zscore_grid` (Eq. 2) - ``zmask.core.statistics``
* :func:`spr_heatmap_direct` (Eq. 3, literal) - ``zmask.core.refinement``; the fast evaluator is
  :class:`~zmask.core.refinement.LayerRefiner`
* :func:`compute_heatmaps` (per-layer SPR, then the max over each set) and :func:`analyze` (the
  whole analysis of one forward pass) - ``zmask.core.analysis``
* :func:`fuse_and_score`, :func:`detection_score` - ``zmask.core.fusion``
* :func:`patch_mask`, :func:`dilate_mask`, :func:`keep_mask`, :func:`apply_mask` (Eq. 4), and
  :func:`straight_through_keep_mask` (Eq. 4 with straight-through gradients, for attacks and the
  ART bridge) - ``zmask.core.masking``
* :func:`roc_auc` (the one ROC AUC) - ``zmask.core.calibration``
"""

from .core.analysis import analyze, compute_heatmaps, kernel_sets
from .core.calibration import roc_auc
from .core.fusion import detection_score, fuse_and_score
from .core.masking import apply_mask, dilate_mask, keep_mask, patch_mask, straight_through_keep_mask
from .core.refinement import layer_heatmap_direct as spr_heatmap_direct
from .core.statistics import zscore, zscore_grid

__all__ = [
    "analyze", "apply_mask", "compute_heatmaps", "detection_score", "dilate_mask", "fuse_and_score", "keep_mask", "kernel_sets",
    "patch_mask", "roc_auc", "spr_heatmap_direct", "straight_through_keep_mask", "zscore", "zscore_grid",
]
