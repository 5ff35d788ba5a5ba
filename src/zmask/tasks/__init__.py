"""Task adapters: the loss an attack optimises and the metric an evaluation reports, per task."""

from .detection import CocoEvaluator, DetectionTask
from .segmentation import ConfusionMatrix, SegmentationTask

__all__ = ["CocoEvaluator", "ConfusionMatrix", "DetectionTask", "SegmentationTask"]
