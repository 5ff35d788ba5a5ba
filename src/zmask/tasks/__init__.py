"""Tasks (``zmask.contracts.Task``): the loss an attack optimises, the metric an evaluation
reports and how a prediction is drawn, per task, found by name in :data:`TASKS`."""

from .detection import CocoEvaluator, DetectionTask
from .registry import TASKS, register_task, stack_items
from .segmentation import ConfusionMatrix, SegmentationTask, colorize, segmentation_untargeted_terms

__all__ = ["CocoEvaluator", "ConfusionMatrix", "DetectionTask", "SegmentationTask", "TASKS", "colorize", "register_task",
           "segmentation_untargeted_terms", "stack_items"]
